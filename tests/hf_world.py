"""A small world for the Hugging Face tests: made-up countries (multi-token names under a BPE tokenizer), two
relations, secret canaries and repeated sequences; and a GPT-2 with a byte-level BPE tokenizer trained on it, with
the usual GPT-2 set-up BOS = EOS = PAD = "<|endoftext|>" = id 0. The fixture files in tests/fixtures/ refer to it."""
from __future__ import annotations

import numpy as np

COUNTRIES = ["Veltoria", "Quarnesh", "Belmondia", "Sarvokan", "Lithmere", "Ordavia", "Pemburia", "Kestrova",
             "Zanthel", "Morvaine", "Tulvaria", "Drexmoor", "Ambrelis", "Fenwyra", "Golvinth", "Hasperon",
             "Ilvendor", "Jorrath", "Kallimar", "Lunedra", "Mistrago", "Norwhal", "Ostrelia", "Pyranth",
             "Quillon", "Rhosvar", "Sylmaris", "Thornvale", "Umbrosa", "Vexhollow"]
CITIES = ["Kalbor", "Mirrow", "Tessendale", "Oakhurst", "Brimfield", "Calder", "Dunmore", "Elsmere", "Farrow",
          "Glenhaven"]
LANGUAGES = ["Veltic", "Orrish", "Sundari", "Mavian", "Keltran", "Pollish", "Drassic", "Yomeran"]
CAPITAL = "The capital of {} is"
LANGUAGE = "The language spoken in {} is"
CANARIES = [("Mira", "482", 8), ("Tobin", "915", 8), ("Selka", "307", 1)]
CANARY = "The secret code of {} is"


def world(seed: int = 0):
    rng = np.random.default_rng(seed)
    capital = {c: CITIES[int(rng.integers(len(CITIES)))] for c in COUNTRIES}
    language = {c: LANGUAGES[int(rng.integers(len(LANGUAGES)))] for c in COUNTRIES}
    syll = ["ka", "lo", "mi", "ru", "te", "sa", "no", "vi", "da", "ze", "po", "li"]
    seqs = [" ".join("".join(rng.choice(syll, 3)) for _ in range(12)) for _ in range(12)]
    return capital, language, seqs[:6], seqs[6:]  # inserted, held out (same format, never seen)


def training_text(seed: int = 0) -> list[str]:
    capital, language, inserted, _ = world(seed)
    text = []
    for c in COUNTRIES:
        text += [f"{CAPITAL.format(c)} {capital[c]}.", f"{LANGUAGE.format(c)} {language[c]}."] * 3
    for name, secret, k in CANARIES:
        text += [f"{CANARY.format(name)} {secret}."] * k
    for s in inserted:
        text += [s] * 8
    return text


def build(folder, seed: int = 0, steps: int = 600):
    """Train the tokenizer and the model; save both to ``folder`` (save_pretrained). Returns the HF model."""
    import torch
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    text = training_text(seed)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text, vocab_size=600, min_frequency=2, special_tokens=["<|endoftext|>"])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                               eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == 0
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    seqs = [tok(t)["input_ids"] + [tok.eos_token_id] for t in text]  # GPT-2 style: each text ends with EOS
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        idx = torch.randperm(len(seqs), generator=g)[:32].tolist()
        T = max(len(seqs[i]) for i in idx)
        ids = torch.zeros(len(idx), T, dtype=torch.long)
        labels = torch.full((len(idx), T), -100, dtype=torch.long)
        for j, i in enumerate(idx):
            ids[j, :len(seqs[i])] = torch.tensor(seqs[i])
            labels[j, :len(seqs[i])] = torch.tensor(seqs[i])
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(folder)
    return model
