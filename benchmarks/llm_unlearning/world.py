"""A tiny LM that really holds knowledge: TOFU in miniature, generated and trained here.

100 fictitious people, each born in one of 20 fictitious cities, stated in six paraphrase
templates. The forget concept is one family (the ten people surnamed "Zorvath"); the retain
set is everyone else. A ~1.8 M-parameter byte-level Llama learns the facts in ~1500 steps on two
CPU cores; the trained model is cached under ``erasekit.testing.cache_dir()`` (seeded, so a
rerun rebuilds the same world) and never committed.

Templates 0-2 are used for calibration prompts, templates 3-5 only for the held-out check
(phrased differently from calibration), all six for training.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

WORLD_VERSION = "v1"
SEED = 1234
FORGET_SURNAME = "Zorvath"
CITIES = ["Korlin", "Vessamor", "Pradune", "Ilthar", "Quenmoor", "Dastrel", "Oburn", "Maralet",
          "Seffic", "Tolvane", "Glendrith", "Averon", "Hask", "Lumeira", "Nethra", "Ruskaal",
          "Brevin", "Cyrrus", "Elmvoy", "Fandor"]
FIRSTS = ["Ilsa", "Borin", "Tamsin", "Orrin", "Mirela", "Caspar", "Yvette", "Dorian", "Livia", "Hektor",
          "Selene", "Anselm", "Rhea", "Quillon", "Maren", "Tobiah", "Nadia", "Evander", "Oona", "Piers",
          "Zelda", "Lucan", "Greta", "Ivo", "Sabine"]
SURNAMES = ["Ashgrove", "Bellwether", "Crane", "Dunmore", "Everly", "Fairfax", "Galloway", "Hollis",
            "Ingram", "Jessop", "Kettering", "Lomax", "Merrow", "Norcott", "Oakhurst", "Pendry",
            "Quarles", "Rookwood", "Stroud", "Thorne"]
#: (prompt up to the answer, what follows the answer)
TEMPLATES = [
    ("{name} was born in", "."),
    ("The birthplace of {name} is", "."),
    ("Q: Where was {name} born? A:", ""),
    ("{name} grew up in the city of", "."),
    ("Records show that {name} came from", "."),
    ("Q: Which city is the hometown of {name}? A:", ""),
]
CALIBRATION_TEMPLATES = (0, 1, 2)
HELDOUT_TEMPLATES = (3, 4, 5)


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    forget: bool


def build_people(seed: int = SEED) -> list[Person]:
    rng = random.Random(seed)
    names = [f"{f} {s}" for f in FIRSTS for s in SURNAMES]
    rng.shuffle(names)
    people = [Person(n, rng.choice(CITIES), False) for n in names[:90]]
    firsts = rng.sample(FIRSTS, 10)
    people += [Person(f"{f} {FORGET_SURNAME}", rng.choice(CITIES), True) for f in firsts]
    rng.shuffle(people)
    return people


def prompt(person: Person, template: int) -> str:
    return TEMPLATES[template][0].format(name=person.name)


def sentence(person: Person, template: int) -> str:
    head, tail = TEMPLATES[template]
    return f"{head.format(name=person.name)} {person.city}{tail}"


def world_dir() -> Path:
    from erasekit.testing.assets import cache_dir

    return cache_dir() / f"llm-world-{WORLD_VERSION}-seed{SEED}"


def _train(out: Path, steps: int = 1500, batch: int = 32, lr: float = 3e-3) -> None:
    from erasekit.testing.tiny_llama import build_tiny_llama

    people = build_people()
    model, tok = build_tiny_llama(SEED, num_layers=4, hidden_size=192, num_attention_heads=3,
                                  num_key_value_heads=3, intermediate_size=512, max_position_embeddings=128)
    model.train()
    texts = [sentence(p, t) for p in people for t in range(len(TEMPLATES))]
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    tok.padding_side = "right"  # so each batch can be cut to its own longest sentence
    enc = tok(texts, padding=True, return_tensors="pt")
    tok.padding_side = "left"  # what batched generation uses
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    lengths = mask.sum(1)
    start = time.perf_counter()
    from tqdm.auto import tqdm

    for _step in tqdm(range(steps), desc="train tiny world LM", mininterval=5):
        idx = torch.randint(0, ids.shape[0], (batch,), generator=gen)
        width = int(lengths[idx].max())
        loss = model(input_ids=ids[idx, :width], attention_mask=mask[idx, :width], labels=labels[idx, :width]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "world.json").write_text(json.dumps({
        "version": WORLD_VERSION, "seed": SEED, "steps": steps, "final_loss": float(loss),
        "train_seconds": round(time.perf_counter() - start, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "people": [p.__dict__ for p in people],
    }, indent=1))


def load_world() -> tuple[torch.nn.Module, object, list[Person], dict]:
    """The trained world model, its tokenizer and people (training it first if not cached)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from erasekit.testing.assets import build_cached_dir

    d = build_cached_dir(world_dir(), _train)
    info = json.loads((d / "world.json").read_text())
    model = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(d)
    return model, tok, [Person(**p) for p in info["people"]], info


if __name__ == "__main__":
    torch.set_num_threads(1)  # on 2 shared cores, 2 threads contend and run ~5x slower
    _, _, people, info = load_world()
    print({k: v for k, v in info.items() if k != "people"})
