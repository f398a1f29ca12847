"""Reference side of distill's decoder parity tests: transformers (PyTorch)
computes what distill must reproduce. Called by worker/tests/decoder.rs.

  make-random OUT --kind llama|qwen2|gqa-llama3|mistral [--seed S] [--old-rope]
      a tiny randomly initialised *ForCausalLM saved with save_pretrained
      (every parameter perturbed so norms and biases are not trivial), a
      ragged batch (right padding) and transformers' logits for it with
      explicit position ids, in OUT/reference.safetensors. --old-rope
      rewrites config.json in transformers 4's spelling (rope_theta +
      rope_scaling) instead of transformers 5's rope_parameters.
  generate MODEL_DIR PROMPTS_JSON OUT_JSON --max-new-tokens N
      greedy generate() for each prompt (a list of token-id lists), one at a
      time (no padding), the new ids per prompt
  gguf-tensors GGUF OUT
      transformers' own GGUF loading (dequantized by the gguf package): the
      state dict as safetensors
  gguf-generate GGUF PROMPTS_JSON OUT_JSON --max-new-tokens N
      the same as generate, for the GGUF loaded by transformers
  gguf-tokenize GGUF TEXTS_JSON OUT_JSON
      transformers' tokenizer built from the GGUF: ids of each text
      (add_special_tokens as default), and of the chat template applied to
      each text as a user message with the generation prompt
"""
import argparse
import json

import torch
from safetensors.torch import save_file


def make_random(a):
    import transformers as t

    torch.manual_seed(a.seed)
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-6,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if a.kind == "llama":
        cfg = t.LlamaConfig(**common, num_key_value_heads=4, tie_word_embeddings=False,
                            rope_theta=500.0)
        cls = t.LlamaForCausalLM
    elif a.kind == "qwen2":
        cfg = t.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=False,
                            rope_theta=1000.0, use_sliding_window=False)
        cls = t.Qwen2ForCausalLM
    elif a.kind == "gqa-llama3":
        cfg = t.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=True,
                            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0,
                                             "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 16})
        cls = t.LlamaForCausalLM
    elif a.kind == "linear":
        cfg = t.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=True,
                            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                             "factor": 4.0})
        cls = t.LlamaForCausalLM
    elif a.kind == "mistral":
        cfg = t.MistralConfig(**common, num_key_value_heads=2, tie_word_embeddings=False,
                              sliding_window=None)
        cls = t.MistralForCausalLM
    else:
        raise SystemExit(f"unknown kind {a.kind}")
    cfg._attn_implementation = "eager"
    m = cls(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.save_pretrained(a.out, safe_serialization=True)
    if a.old_rope:
        path = f"{a.out}/config.json"
        c = json.load(open(path))
        rp = c.pop("rope_parameters")
        c["rope_theta"] = rp.pop("rope_theta")
        c["rope_scaling"] = None if rp.get("rope_type") == "default" else rp
        json.dump(c, open(path, "w"), indent=2)
    # A ragged batch, right-padded, with explicit positions.
    g = torch.Generator().manual_seed(a.seed + 1)
    lengths = [11, 4, 7, 11, 1]
    ids = torch.randint(3, 96, (len(lengths), 11), generator=g)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        mask[r, :n] = 1
    ids = ids * mask
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = m(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    save_file({"input_ids": ids, "attention_mask": mask, "logits": logits.contiguous()},
              f"{a.out}/reference.safetensors")


def greedy(m, prompts, n, eos):
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            g = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           do_sample=False, eos_token_id=eos, pad_token_id=0)
            out.append(g[0, len(p):].tolist())
    return out


def generate(a):
    import os
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    if os.path.exists(os.path.join(a.model, "tokenizer.json")):
        tok = AutoTokenizer.from_pretrained(a.model)
        assert tok("hello world")["input_ids"], "the exported tokenizer encodes nothing"
    prompts = json.load(open(a.prompts))
    json.dump(greedy(m, prompts, a.max_new_tokens, m.generation_config.eos_token_id), open(a.out, "w"))


def gguf_dir_file(path):
    import os
    return os.path.dirname(os.path.abspath(path)), os.path.basename(path)


def gguf_tensors(a):
    from transformers import AutoModelForCausalLM
    d, f = gguf_dir_file(a.gguf)
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    save_file({k: v.contiguous() for k, v in m.state_dict().items() if k != "lm_head.weight" or not m.config.tie_word_embeddings}, a.out)


def gguf_generate(a):
    from transformers import AutoModelForCausalLM
    d, f = gguf_dir_file(a.gguf)
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    prompts = json.load(open(a.prompts))
    json.dump(greedy(m, prompts, a.max_new_tokens, m.generation_config.eos_token_id), open(a.out, "w"))


def gguf_tokenize(a):
    from transformers import AutoTokenizer
    d, f = gguf_dir_file(a.gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    texts = json.load(open(a.texts))
    plain = [tok(x)["input_ids"] for x in texts]
    chat = [tok.apply_chat_template([{"role": "user", "content": x}], add_generation_prompt=True,
                                    tokenize=True, return_dict=False) for x in texts]
    chat = [list(c["input_ids"]) if isinstance(c, dict) or hasattr(c, "keys") else list(c) for c in chat]
    json.dump({"plain": plain, "chat": chat,
               "chat_text": [tok.apply_chat_template([{"role": "user", "content": x}],
                                                     add_generation_prompt=True, tokenize=False)
                             for x in texts]}, open(a.out, "w"))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("make-random")
    r.add_argument("out")
    r.add_argument("--kind", required=True)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--old-rope", action="store_true")
    g = sub.add_parser("generate")
    g.add_argument("model")
    g.add_argument("prompts")
    g.add_argument("out")
    g.add_argument("--max-new-tokens", type=int, default=16)
    t = sub.add_parser("gguf-tensors")
    t.add_argument("gguf")
    t.add_argument("out")
    gg = sub.add_parser("gguf-generate")
    gg.add_argument("gguf")
    gg.add_argument("prompts")
    gg.add_argument("out")
    gg.add_argument("--max-new-tokens", type=int, default=64)
    tk = sub.add_parser("gguf-tokenize")
    tk.add_argument("gguf")
    tk.add_argument("texts")
    tk.add_argument("out")
    a = p.parse_args()
    {"make-random": make_random, "generate": generate, "gguf-tensors": gguf_tensors,
     "gguf-generate": gguf_generate, "gguf-tokenize": gguf_tokenize}[a.cmd](a)


if __name__ == "__main__":
    main()
