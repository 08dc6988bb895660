"""Independent reference for one optimizer step of the multi-objective DPO trainer: the loss
and the gradients of every trainable adapter tensor, for each stage of each training method
(METHOD.md sections 2-5), computed in plain PyTorch on the Hugging Face `transformers` model
with no code of the Rust project. A Rust test writes the step's inputs, runs this script and
compares its own gradients with the ones written here.

Usage: python reference_step.py INPUT.safetensors OUTPUT.safetensors [INPUT OUTPUT ...]
(several steps in one run share the cost of starting Python and importing torch).

INPUT metadata `spec` (JSON): model_dir, beta, k, method (curriculum | panacea-lora | panacea |
dpo-soup), stage (1-3, curriculum only), rank, alpha, adapter_kind (lora | adalora), shared,
orth_reg_weight, length_correction (none | per-token | r-dpo), length_alpha. INPUT tensors:
`pair{j}.prompt`, `pair{j}.a`, `pair{j}.b` (int64 token ids),
`preferences` int64 [N, k] in {-1, 0, 1}, `weights` f32 [N, k], and for every adapted
projection `{module}.shared_a` [r, in], `.shared_b` [out, r] (when shared), `.dims_a`
[k*r, in], `.dims_b` [out, k*r], plus `.shared_e` [r] / `.dims_e` [k*r] for AdaLoRA.
OUTPUT: `loss` (0-dim) and `grad.{name}` for every trainable adapter tensor, metadata `spec`.
"""

import json
import sys

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class AdapterState:
    """The weight vector of the current forward, shared by every wrapper: None = adapters off
    (pi_ref), a length-k tensor otherwise (all zeros = shared block only)."""

    def __init__(self):
        self.w = None


class AdaptedLinear(torch.nn.Module):
    """`W x + b + s (h_0(x) + sum_i w_i h_i(x))` around a frozen nn.Linear, where
    h_j(x) = B_j (A_j x) for LoRA and B_j ((A_j x) * lambda_j) for AdaLoRA (PEFT's SVD form)."""

    def __init__(self, base, params, state, spec):
        super().__init__()
        self.base, self.params, self.state = base, params, state
        self.rank, self.adalora = spec["rank"], spec["adapter_kind"] == "adalora"
        # PEFT's AdaLoRA divides by (ranknum + 1e-5) rather than by r.
        r = self.rank + 1e-5 if self.adalora else self.rank
        self.scale = spec["alpha"] / r

    def low_rank(self, x, kind, row_scale=None):
        h = x @ self.params[f"{kind}_a"].T
        if self.adalora:
            h = h * self.params[f"{kind}_e"]
        if row_scale is not None:
            h = h * row_scale
        return h @ self.params[f"{kind}_b"].T

    def forward(self, x):
        out = self.base(x)
        w = self.state.w
        if w is None:
            return out
        # Scaling each rank-1 row of block i by w_i gives sum_i w_i B_i A_i x in one product.
        delta = self.low_rank(x, "dims", w.repeat_interleave(self.rank))
        if "shared_a" in self.params:
            delta = delta + self.low_rank(x, "shared")
        return out + self.scale * delta


def load_model(spec, tensors, dtype):
    """The base model with every projection wrapped; returns (model, state, {name: leaf})."""
    model = AutoModelForCausalLM.from_pretrained(
        spec["model_dir"], dtype=torch.float32, attn_implementation="eager").to(dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    state, leaves = AdapterState(), {}
    for layer in range(model.config.num_hidden_layers):
        for projection in PROJECTIONS:
            module = f"model.layers.{layer}.{projection}"
            params = {}
            for kind in ("shared", "dims"):
                for part in ("a", "b", "e"):
                    name = f"{module}.{kind}_{part}"
                    if name in tensors:
                        leaf = tensors[name].to(dtype).clone().requires_grad_(True)
                        params[f"{kind}_{part}"] = leaves[name] = leaf
            if "dims_a" not in params or ("shared_a" in params) != spec["shared"]:
                raise SystemExit(f"adapter tensors of {module} missing or inconsistent")
            parent_name, child = module.rsplit(".", 1)
            parent = model.get_submodule(parent_name)
            setattr(parent, child, AdaptedLinear(getattr(parent, child), params, state, spec))
    return model, state, leaves


def sequence_logp(model, state, prompt, response, w):
    """log pi(response | prompt) at weight w: each response token scored by the logits of
    the position before it; prompt tokens are not scored."""
    state.w = w
    ids = torch.cat([prompt, response]).unsqueeze(0)
    logits = model(input_ids=ids, use_cache=False).logits[0]
    logprobs = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
    return logprobs.gather(1, response.unsqueeze(1)).sum()


def pair_ids(tensors):
    count = sum(1 for name in tensors if name.endswith(".prompt"))
    return [(tensors[f"pair{j}.prompt"], tensors[f"pair{j}.a"], tensors[f"pair{j}.b"])
            for j in range(count)]


def margin(model, state, pair, ref_pair, w, spec):
    """m(w) = u(a; w) - u(b; w), u = log pi(.; w) - log pi_ref; with a length correction
    (lengths in tokens, EOS included): per-token, u(a)/|a| - u(b)/|b|; r-dpo (Park et al.
    2024: beta m + alpha (|y_w| - |y_l|) inside the sigmoid), m + alpha/beta (|a| - |b|)."""
    prompt, a, b = pair
    u_a = sequence_logp(model, state, prompt, a, w) - ref_pair[0]
    u_b = sequence_logp(model, state, prompt, b, w) - ref_pair[1]
    correction = spec.get("length_correction", "none")
    if correction == "per-token":
        return u_a / len(a) - u_b / len(b)
    if correction == "r-dpo":
        return u_a - u_b + spec["length_alpha"] / spec["beta"] * (len(a) - len(b))
    assert correction == "none", correction
    return u_a - u_b


def dpo_terms(pref, margins, beta):
    """|p| * -logsigmoid(beta p m) per pair; p = 0 (no preference) contributes nothing."""
    p = pref.to(margins.dtype)
    return p.abs() * -F.logsigmoid(beta * p * margins)


def orthogonality_penalty(leaves, rank):
    """Mean over every module (shared block, each dimension block) of every projection of
    ||Q Q^T - I||_F and ||P^T P - I||_F (PEFT's AdaLoRA regulariser)."""
    norms = []
    for name, a in leaves.items():
        if not name.endswith(("shared_a", "dims_a")):
            continue
        b = leaves[name[:-1] + "b"]
        eye = torch.eye(rank, dtype=a.dtype)
        for j in range(a.shape[0] // rank):
            q, p = a[j * rank:(j + 1) * rank], b[:, j * rank:(j + 1) * rank]
            norms.append(torch.linalg.matrix_norm(q @ q.T - eye))
            norms.append(torch.linalg.matrix_norm(p.T @ p - eye))
    return torch.stack(norms).mean()


def step_loss(spec, tensors, model, state, leaves, dtype):
    """The step's whole loss as one scalar (means over the global batch of N pairs)."""
    beta, k, method, stage = spec["beta"], spec["k"], spec["method"], spec.get("stage")
    pairs = pair_ids(tensors)
    prefs, weights = tensors["preferences"], tensors["weights"].to(dtype)
    n = len(pairs)
    with torch.no_grad():
        refs = [(sequence_logp(model, state, p, a, None), sequence_logp(model, state, p, b, None))
                for p, a, b in pairs]

    def margins(w_of_pair):
        return torch.stack([margin(model, state, pairs[j], refs[j], w_of_pair(j), spec)
                            for j in range(n)])

    if method == "curriculum" and stage == 1:
        # All dimensions agree on D_agree: one pass with the shared block only.
        signs = torch.sign(prefs.sum(dim=1))
        zero = torch.zeros(k, dtype=dtype)
        return dpo_terms(signs, margins(lambda j: zero), beta).sum() / n

    eye = torch.eye(k, dtype=dtype)
    per_dim = torch.stack([margins(lambda j, i=i: eye[i]) for i in range(k)], dim=1)  # [N, k]
    loss = sum(dpo_terms(prefs[:, i], per_dim[:, i], beta).sum()
               / max(1, int((prefs[:, i] != 0).sum())) for i in range(k))
    if method == "dpo-soup" or (method == "curriculum" and stage == 2):
        return loss

    drawn = margins(lambda j: weights[j])  # [N], m_j(weights[j])
    if method == "curriculum":
        # Teacher from the detached per-dimension margins; only the student logit has gradient.
        t = beta * (weights * per_dim.detach()).sum(dim=1)
        z = beta * drawn
        p = torch.sigmoid(t)
        kl = (p * (F.logsigmoid(t) - F.logsigmoid(z))
              + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-z)))
        return loss + kl.sum() / n
    # Linear scalarisation at the drawn weights (Panacea, LoRA or AdaLoRA).
    ls = sum(weights[:, i] * dpo_terms(prefs[:, i], drawn, beta) for i in range(k))
    loss = loss + ls.sum() / n
    if method == "panacea":
        loss = loss + spec["orth_reg_weight"] * orthogonality_penalty(leaves, spec["rank"])
    return loss


def trainable(spec, name):
    """Stage 1 trains the shared block, stage 2 and DPO-Soup the dimension blocks, the rest all."""
    if spec["method"] == "curriculum" and spec["stage"] == 1:
        return ".shared_" in name
    if spec["method"] == "dpo-soup" or (spec["method"] == "curriculum" and spec["stage"] == 2):
        return ".dims_" in name
    return True


def run(input_path, dtype=torch.float32):
    """Loss and gradients of the step described by `input_path`: (loss, grads, raw spec)."""
    with safe_open(input_path, framework="pt") as f:
        raw_spec = f.metadata()["spec"]
    spec, tensors = json.loads(raw_spec), load_file(input_path)
    if spec["method"] not in ("curriculum", "panacea-lora", "panacea", "dpo-soup"):
        raise SystemExit(f"unknown method {spec['method']!r}")
    model, state, leaves = load_model(spec, tensors, dtype)
    loss = step_loss(spec, tensors, model, state, leaves, dtype)
    loss.backward()
    grads = {name: (leaf.grad if leaf.grad is not None else torch.zeros_like(leaf))
             for name, leaf in leaves.items() if trainable(spec, name)}
    return loss.detach(), grads, raw_spec


def main():
    paths = sys.argv[1:]
    if not paths or len(paths) % 2:
        raise SystemExit("usage: reference_step.py INPUT OUTPUT [INPUT OUTPUT ...]")
    for input_path, output_path in zip(paths[0::2], paths[1::2]):
        loss, grads, raw_spec = run(input_path)
        out = {"loss": loss.float().reshape(())}
        out.update({f"grad.{name}": g.float().contiguous() for name, g in grads.items()})
        save_file(out, output_path, metadata={"spec": raw_spec})
        print(f"{input_path}: loss {loss.item():.8g}, {len(grads)} gradient tensors")


if __name__ == "__main__":
    main()
