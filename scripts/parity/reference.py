"""Reference side of distill's parity tests: transformers (PyTorch) computes
what distill must reproduce. Called by the Rust tests in worker/tests/.

  make-random OUT --seed S --layers L --hidden H --heads A --intermediate I --vocab V --labels K [--mlm]
      a randomly initialised BertForSequenceClassification (with --mlm a
      BertForMaskedLM: an encoder with its masked-LM head, cls.predictions.*)
      (every parameter perturbed, so biases and LayerNorms are not trivial)
      and a WordPiece tokenizer.json over V tokens, saved with save_pretrained
  run MODEL_DIR INPUTS OUT --task classification|embedding|mlm [--normalize]
      load with Auto* (eager attention), run input_ids/attention_mask/
      token_type_ids from INPUTS (safetensors), write hidden_states.N,
      attentions.N and logits or embeddings to OUT; fail on any missing or
      unexpected weight
  tokenize MODEL_DIR TEXTS_JSONL OUT --max-length L
      the HF fast tokenizer's ids, padded to the longest, as input_ids/attention_mask
"""
import argparse
import json
import sys

import torch
from safetensors.torch import load_file, save_file


def make_random(a):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, normalizers
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, PreTrainedTokenizerFast

    torch.manual_seed(a.seed)
    cfg = BertConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, intermediate_size=a.intermediate,
        max_position_embeddings=64, num_labels=a.labels,
        id2label={i: f"class_{i}" for i in range(a.labels)},
        label2id={f"class_{i}": i for i in range(a.labels)},
    )
    m = (BertForMaskedLM if a.mlm else BertForSequenceClassification)(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.save_pretrained(a.out, safe_serialization=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(len(specials), a.vocab)])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(a.out)


def run(a):
    from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

    cls = {"classification": AutoModelForSequenceClassification, "mlm": AutoModelForMaskedLM}.get(a.task, AutoModel)
    model, info = cls.from_pretrained(a.model, attn_implementation="eager", output_loading_info=True)
    # A classification checkpoint read as a plain encoder may carry its head,
    # a masked-LM one its cls.predictions.
    info["unexpected_keys"] = [k for k in info.get("unexpected_keys", [])
                               if not k.startswith(("classifier.", "cls."))]
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        sys.exit(f"reference: loading {a.model} reported {bad}")
    model.eval()
    inp = load_file(a.inputs)
    with torch.no_grad():
        out = model(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"],
                    token_type_ids=inp["token_type_ids"], output_hidden_states=True, output_attentions=True)
    res = {}
    for i, h in enumerate(out.hidden_states):
        res[f"hidden_states.{i}"] = h.contiguous()
    for i, t in enumerate(out.attentions):
        res[f"attentions.{i}"] = t.contiguous()
    if a.task in ("classification", "mlm"):
        res["logits"] = out.logits.contiguous()
    else:
        last = out.last_hidden_state
        m = inp["attention_mask"].unsqueeze(-1).to(last.dtype)
        e = (last * m).sum(1) / m.sum(1).clamp(min=1e-9)
        if a.normalize:
            e = torch.nn.functional.normalize(e, p=2, dim=1)
        res["embeddings"] = e.contiguous()
    save_file(res, a.out)


def tokenize(a):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    texts = [json.loads(l)["text"] for l in open(a.texts, encoding="utf-8") if l.strip()]
    enc = tok(texts, padding=True, truncation=True, max_length=a.max_length, return_tensors="pt")
    save_file({"input_ids": enc["input_ids"].contiguous(), "attention_mask": enc["attention_mask"].contiguous()}, a.out)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("make-random")
    r.add_argument("out")
    for f in ["seed", "layers", "hidden", "heads", "intermediate", "vocab", "labels"]:
        r.add_argument("--" + f, type=int, required=True)
    r.add_argument("--mlm", action="store_true")
    r = sub.add_parser("run")
    r.add_argument("model"); r.add_argument("inputs"); r.add_argument("out")
    r.add_argument("--task", choices=["classification", "embedding", "mlm"], required=True)
    r.add_argument("--normalize", action="store_true")
    r = sub.add_parser("tokenize")
    r.add_argument("model"); r.add_argument("texts"); r.add_argument("out")
    r.add_argument("--max-length", type=int, default=128)
    a = p.parse_args()
    {"make-random": make_random, "run": run, "tokenize": tokenize}[a.cmd](a)


if __name__ == "__main__":
    main()
