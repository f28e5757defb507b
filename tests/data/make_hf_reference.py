"""Makes tests/data/hf_llama_tiny: a tiny random Llama-3.1-style model saved by `transformers`,
and its greedy tokens and logits on a fixed input of a few thousand tokens.

`tests/test_hf_reference.py` loads the model with `moska_jax.checkpoint.load_hf_llama` and checks
the plain decoder and `MoskaEngine` against these numbers: a peer reference that does not come
from this project's code.

The model has what matters for Llama-3.1 and is small: llama3 RoPE scaling with an original
context of 256 positions (factor 8, low 1, high 4; the input reaches past 2,500 positions, and
with head_dim 16 and theta 10,000 its eight frequencies fall in all three regimes of the
scaling: kept, smoothly blended, divided by the factor), GQA (4 query heads, 2 kv heads), an
untied LM head, random RMSNorm scales. Weights are drawn wider than transformers' default
(std 0.02) so that attention is peaked (positions matter) and greedy choices have clear margins.

The reference comes from repeated full forward passes (argmax of the last position's logits),
not from `generate`. Input: a shared prefix of 2,500 random tokens and three short prompts; for
each prompt, the sequence [prefix + prompt] is extended greedily by 8 tokens. reference.npz holds:

  shared [S] int32, prompt_0..2 [L_r] int32: the input;
  tokens [R, 8] int32: the greedy tokens; step_logits [R, 8, V] float32: the logits each token
    was chosen from;
  positions [P] int32, position_logits [P, V] float32: every 64th position's logits of the last
    full forward pass of prompt 0 (prefix + prompt + the first 7 generated tokens);
  margin float32: the smallest gap between the best and second-best logit of any greedy step.

Made on CPU in its own virtual environment (torch is not a dependency of moska-jax), from the
repository root (.venv* is git-ignored):

    python3 -m venv .venv-hf
    .venv-hf/bin/pip install torch==2.13.0 transformers==5.24.0 safetensors numpy
    .venv-hf/bin/python tests/data/make_hf_reference.py

The versions it ran with are written into reference.npz (`versions`).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_llama_tiny")
SHARED, PROMPTS, NEW, STRIDE = 2500, (5, 17, 33), 8, 64


def model() -> LlamaForCausalLM:
  cfg = LlamaConfig(
      vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
      rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
      rope_scaling={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 256},
      rope_theta=10000.0, attn_implementation="eager", torch_dtype=torch.float32)
  torch.manual_seed(0)
  m = LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in m.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif "embed_tokens" in name:
        p.normal_(0.0, 1.0)
      elif "q_proj" in name or "k_proj" in name:
        p.normal_(0.0, 0.6)  # peaked attention: scores of several units
      else:
        p.normal_(0.0, 1.5 / p.shape[1] ** 0.5)
  return m


def greedy(m: LlamaForCausalLM, ids: list[int]):
  """NEW greedy tokens by full forward passes; their logits, and the last pass's logits."""
  tokens, steps = [], []
  for _ in range(NEW):
    with torch.no_grad():
      logits = m(torch.tensor([ids + tokens])).logits[0].double().numpy()
    steps.append(logits[-1])
    tokens.append(int(np.argmax(logits[-1])))
  return tokens, np.stack(steps), logits


def main() -> None:
  m = model()
  rng = np.random.default_rng(0)
  V = m.config.vocab_size
  shared = rng.integers(0, V, SHARED).astype(np.int32)
  prompts = [rng.integers(0, V, n).astype(np.int32) for n in PROMPTS]
  tokens, step_logits, last = [], [], None
  for r, p in enumerate(prompts):
    t, s, full = greedy(m, shared.tolist() + p.tolist())
    tokens.append(t)
    step_logits.append(s)
    if r == 0:
      last = full
  step_logits = np.stack(step_logits)
  top2 = np.sort(step_logits, axis=-1)[..., -2:]
  margin = float((top2[..., 1] - top2[..., 0]).min())
  positions = np.arange(0, last.shape[0], STRIDE, dtype=np.int32)
  if os.path.exists(OUT):
    shutil.rmtree(OUT)
  m.save_pretrained(OUT, safe_serialization=True)
  gen = os.path.join(OUT, "generation_config.json")
  if os.path.exists(gen):
    os.remove(gen)  # not used: the reference is greedy over full forward passes
  versions = json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                         "numpy": np.__version__})
  np.savez_compressed(
      os.path.join(OUT, "reference.npz"), shared=shared,
      **{f"prompt_{r}": p for r, p in enumerate(prompts)},
      tokens=np.asarray(tokens, np.int32), step_logits=step_logits.astype(np.float32),
      positions=positions, position_logits=last[positions].astype(np.float32),
      margin=np.float32(margin), versions=np.array(versions))
  print(f"wrote {OUT}: tokens {tokens}, smallest greedy margin {margin:.3f}, {versions}")


if __name__ == "__main__":
  main()
