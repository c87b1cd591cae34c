"""Demo section "llm": calibrate a concept on the real SmolLM2-135M-Instruct and guard it.

Shows, on the same batch, the unguarded and guarded answers side by side (Harry Potter erased
for the rows that ask for it, through the Policy), and a benign prompt whose output is
token-identical to the unguarded model's.
"""

from __future__ import annotations

import time

import torch

FEW_SHOT = ("Question: What is the capital of Canada?\nAnswer: Ottawa\n\n"
            "Question: Who invented the telephone?\nAnswer: Alexander Graham Bell\n\n"
            "Question: {prompt}\nAnswer:")
FORGET = [
    "What is the name of the school of witchcraft Harry Potter attends?",
    "Who wrote the Harry Potter books?",
    "Which Hogwarts house is Harry Potter sorted into?",
    "Who is the headmaster of Hogwarts in Harry Potter?",
    "What is the name of Harry Potter's owl?",
    "What sport do wizards play on broomsticks in Harry Potter?",
    "What train takes students to Hogwarts?",
    "Who are Harry Potter's two best friends?",
    "What is the surname of Harry Potter's friend Hermione?",
    "What is the surname of Harry Potter's rival Draco?",
    "Who is the dark wizard who killed Harry Potter's parents?",
    "What do wizards in Harry Potter call non-magical people?",
]
RETAIN = [
    "What is the capital of Japan?", "What is the capital of Italy?", "What is the capital of Germany?",
    "Who painted the Mona Lisa?", "How many legs does a spider have?", "What is the largest ocean on Earth?",
    "What language is spoken in Brazil?", "What gas do humans need to breathe?", "Who wrote Romeo and Juliet?",
    "What is the chemical formula of water?", "Which planet has the most famous rings?",
    "What is the currency of the United States?", "Who discovered gravity when an apple fell?",
    "What is the capital of Russia?", "What is the opposite of hot?", "What do bees make?",
]
ASK = ["Harry Potter studies magic at which school?", "Name the author of the Harry Potter novels.",
       "In Harry Potter, students ride which train to school?"]
BENIGN = "Which city is Japan's capital?"


def run(report) -> None:  # noqa: ANN001 - DemoReport, imported lazily by the demo runner
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from erasekit import Concept, Policy, calibrate, guard
    from erasekit.testing.assets import smollm2_dir

    torch.set_num_threads(1)  # fastest on small shared CPUs
    path = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    concept = Concept("harry_potter", forget=FORGET, retain=RETAIN,
                      keywords=["Harry Potter", "Hogwarts", "Voldemort"], target="I don't know.")
    start = time.perf_counter()
    pack = calibrate(model, concept, "kif", tokenizer=tok, progress=False,
                     hyperparameters={"prompt_template": FEW_SHOT, "router": True, "refusal_strength": 1.0,
                                      "refusal_units": "residual_norm"})
    out_dir = report.out_dir / "packs" / "smollm2-harry_potter"
    pack.save_pretrained(out_dir)
    report.say(f"Calibrated KIF pack for `harry_potter` on SmolLM2-135M-Instruct from {len(FORGET)} forget + "
               f"{len(RETAIN)} retain prompts in {time.perf_counter() - start:.1f} s "
               f"(edited layer {pack.tensors['layers'].tolist()}), saved to `{out_dir}`.")
    policy = Policy({"harry_potter": {"pack": str(out_dir)}})
    prompts = ASK + [BENIGN]
    enc = tok([FEW_SHOT.replace("{prompt}", p) for p in prompts], return_tensors="pt", padding=True)
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tok.pad_token_id}

    def answers(ids: torch.Tensor) -> list[str]:
        return [tok.decode(r, skip_special_tokens=True).strip().split("\n")[0]
                for r in ids[:, enc["input_ids"].shape[1]:]]

    with torch.inference_mode():
        base = model.generate(**enc, **kw)
        with guard(model, policy=policy, tokenizer=tok) as g:
            # every row asks for harry_potter to be erased; the router decides where it applies
            erased = g.generate(**enc, erase=["harry_potter"], prompts=prompts, **kw)
            mixed = g.generate(**enc, erase=[["harry_potter"], [], ["harry_potter"], ["harry_potter"]],
                               prompts=prompts, **kw)
    report.say("")
    report.say("| prompt | unguarded | guarded (erase=harry_potter) |")
    report.say("|---|---|---|")
    for p, a, b in zip(prompts, answers(base), answers(erased), strict=True):
        report.say(f"| {p} | {a} | {b} |")
    same = torch.equal(erased[-1], base[-1])
    report.say("")
    report.say(f"Benign prompt {BENIGN!r} with the concept toggled on: output token-identical to the unguarded "
               f"model: **{same}**.")
    report.say(f"Per-row toggles in one batch (row 2 not erased): row 2 identical to unguarded: "
               f"**{torch.equal(mixed[1], base[1])}**.")
    if not same:
        raise RuntimeError("benign output changed under the guard")
