"""Rank-one model editing (ROME, Meng et al. 2022) and MEMIT (Meng et al. 2023) on TransformerLens models.

An MLP's output matrix ``W`` (site ``blocks.{l}.mlp.out``: its input is the hidden activation, the *key* ``k``, its
output the MLP's contribution to the residual stream, the *value*) is treated as a linear associative memory.

**ROME** rewrites one fact ``(subject, prompt) -> target_new`` at one layer:

1. ``k*``: the key at the subject's last token, averaged over ``context_templates`` (the original uses 20
   model-generated prefixes; the tiny testbed, trained on single sentences, uses the bare prompt).
2. ``v* = h + delta``: ``h`` is the MLP output at that token; ``delta`` is optimised (Adam, ``v_lr`` 0.5,
   ``v_steps`` 20, stop when the loss is below 0.05) so that the model predicts ``target_new``: mean target NLL
   (teacher forcing) + ``kl_factor`` (0.0625) x KL(current || initial) of the next-token distribution at the
   subject of the ``kl_prompts`` ("{} is a") + ``v_weight_decay`` (0.5) x ``|delta| / |h|^2``; after every step
   ``|delta|`` is clamped to ``clamp_norm_factor`` (4) x ``|h|``. These are the constants of kmeng01/rome's GPT-2 XL
   configuration, including its KL direction and its unsquared decay term.
3. ``W' = W + (v* - W k - b) (C^-1 k*)^T / ((C^-1 k*)^T k)``, with ``k`` the key of the bare prompt, so the edited
   key maps to ``v*`` exactly; ``C = E[k k^T]`` is the uncentred second moment of keys over text the model was
   trained on (:func:`key_second_moment`); ``C = None`` uses the identity (EasyEdit's default) for comparison.

**MEMIT** rewrites many facts over several layers: targets ``z_i = h_L + delta_i`` of the residual stream after
the last edited layer ``L`` (same loss, ``clamp_norm_factor`` 0.75), then, layer by layer from the bottom, ``Delta W_l
= R_l [(lambda C_l + K K^T)^-1 K]^T`` with ``R_l`` the remaining error at ``L`` divided by the number of layers left
(``lambda`` = ``mom2_update_weight``).

An :class:`Edit` holds weight deltas by parameter name; ``with edit.applied(model):`` applies it and restores every
weight bit for bit on exit (it is :func:`memloc.hooks.replace_parameters`); ``edit.apply(model)`` applies it for
good and returns a function that undoes it exactly.

**Tokenization** is the :class:`~memloc.models.lm.LM` handle's: its BOS policy applies to edit prompts, KL
prompts and statistics texts alike (``LM(..., prepend_bos=False)`` is kmeng01/rome's GPT-2 convention, and the
default for a GPT-2 tokenizer); the subject's last token comes from character offsets (multi-token subjects);
targets are tokenized with a leading space (multi-token targets are teacher-forced).

**Honest outcomes.** Every edit's ``info`` records whether it took (:func:`edit_outcomes`): ``nll_after`` (target
NLL per token on the rewrite prompt with the edit applied), ``took`` (greedy decoding then reproduces the new
target), ``update_rel`` (``|v* - v| / |v|`` at the edited key) and ``update_vs_typical`` (against the root mean
square value ``sqrt(tr(W C W^T))`` of the layer when ``C`` is known), ``entropy_before`` / ``entropy_after``
(n-gram entropy x100 of a greedy continuation of the rewrite prompt) and ``flag``: ``"ok"``, ``"did not take"``
or ``"collapse"`` (the continuation's entropy fell below half of what it was: a disabling edit).
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..hooks import capture, hooks, replace_parameters, require_eval
from ..models.lm import OUT_MODULE, mlp_out_weight  # the MLP output projection (re-exported)

__all__ = ["Request", "EditConfig", "Edit", "rome", "memit", "alphaedit", "NullSpace", "null_space",
           "context_templates", "key_second_moment", "subject_last_index", "mlp_out_weight", "edit_outcomes",
           "OUT_MODULE", "RESID", "KEY_MODES"]

KEY, VALUE = OUT_MODULE + ".hook_in", OUT_MODULE + ".hook_out"  # hook points on its input and output
RESID = "blocks.{}.hook_resid_post"
KEY_MODES = ("original", "prefix", "prompt")


@dataclass(frozen=True)
class Request:
    """Rewrite ``prompt.format(subject) -> target_new`` (``target_true``: the current object, for evaluation)."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    def __post_init__(self):
        if self.prompt.count("{}") != 1:
            raise ValueError(f"A request's prompt must contain '{{}}' once, where the subject goes; "
                             f"got {self.prompt!r}.")

    @property
    def text(self) -> str:
        return self.prompt.format(self.subject)


@dataclass
class EditConfig:
    """Hyperparameters of the value optimisation and the update (defaults: kmeng01/rome, GPT-2 XL)."""

    v_lr: float = 0.5
    v_steps: int = 20
    kl_factor: float = 0.0625
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    early_stop: float = 0.05
    context_templates: tuple[str, ...] = ("{}",)
    kl_prompts: tuple[str, ...] = ("{} is a",)
    mom2_update_weight: float = 15000.0  # MEMIT's lambda
    keys: str = "original"  # ROME: "original" (kmeng01/rome), "prefix" (r-ROME) or "prompt"; see rome()
    l2: float = 10.0  # AlphaEdit's ridge term (jianghoucheng/AlphaEdit's "L2")

    def __post_init__(self):
        if self.keys not in KEY_MODES:
            raise ValueError(f"The 'keys' parameter must be one of {KEY_MODES}. Got {self.keys!r} instead.")
        if not self.context_templates or any(c.count("{}") != 1 for c in self.context_templates):
            raise ValueError("Every context template must contain '{}' once, where the prompt goes; got "
                             f"{self.context_templates!r}.")

    @classmethod
    def memit(cls, **kw) -> "EditConfig":
        """MEMIT's defaults: ``clamp_norm_factor`` 0.75."""
        return cls(**{"clamp_norm_factor": 0.75, **kw})


@dataclass
class Edit:
    """Weight deltas ``{parameter name: delta}``, diagnostics (``info``: plain numbers and strings, JSON-safe,
    including ``losses`` per step and ``v_loss_layer``) and the computation's tensors (``intermediates``, float64,
    CPU).

    ROME's intermediates: ``k_star`` (the key averaged over the context templates, ``[d_mlp]``), ``c_inv_k``
    (``C^-1 k*``), ``u`` (``c_inv_k`` normalised, the update's left vector), ``key`` and ``value`` (the bare prompt's
    key ``k`` and current value ``W k + b``), ``h`` (the value the optimisation started from), ``delta`` and
    ``v_star = h + delta``; the update is ``outer((v_star - value) / (key @ u), u)``.
    MEMIT's: ``z`` (``[n, d_model]`` targets at the last edited layer), ``h`` (the values they started from),
    ``delta``, and per edited layer ``{layer: tensor}``: ``keys`` (``K^T``, ``[n, d_mlp]``), ``current`` (the residual
    at the last edited layer before this layer's update), ``residuals`` (``R^T``, the error this layer takes on) and
    ``u`` (``[(lambda C + K K^T)^-1 K]^T``, so that the layer's update is ``residuals^T @ u``).
    """

    deltas: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)
    intermediates: dict = field(default_factory=dict)

    def _new_values(self, model) -> dict[str, torch.Tensor]:
        params = dict(model.named_parameters())
        return {n: params[n].detach() + d.to(params[n].dtype) for n, d in self.deltas.items()}

    def applied(self, model):
        """Context manager: the model is edited inside the block and restored bit for bit on exit."""
        return replace_parameters(model, self._new_values(model))

    def apply(self, model) -> Callable[[], None]:
        """Apply the edit for good; returns ``undo()``, which restores the original weights bit for bit (undo several
        edits in the reverse order of applying them; out of order, ``undo()`` refuses)."""
        params = dict(model.named_parameters())
        saved = {n: params[n].detach().clone() for n in self.deltas}
        new = self._new_values(model)
        with torch.no_grad():
            for n, v in new.items():
                params[n].copy_(v)

        done = []

        def undo():
            """Restore the weights from before ``apply``. Undo edits in the reverse order of applying them: if the
            weights changed since (another edit applied later and not undone), undoing this one would drop that
            change or bring this one back, so it is refused. A second call does nothing."""
            if done:
                return
            if not all(torch.equal(params[n], v) for n, v in new.items()):
                from ..validate import MemlocError
                raise MemlocError("This edit's weights changed since it was applied (another edit applied after it is "
                                  "still in place); undo edits in the reverse order of applying them.")
            with torch.no_grad():
                for n, v in saved.items():
                    params[n].copy_(v)
            done.append(True)
        return undo


# ---------------------------------------------------------------------------------------------------------------
# tokenization and positions (through the LM handle)


def _lm(lm):
    from ..models.lm import as_lm
    return as_lm(lm)


def subject_last_index(lm, prompt: str, subject: str) -> int:
    """Index of the subject's last token in ``lm.encode(prompt.format(subject))`` (the ``{}`` occurrence), from
    character offsets."""
    lm = _lm(lm)
    return lm.span(prompt.format(subject), subject, start=prompt.index("{}"))[-1]


# ---------------------------------------------------------------------------------------------------------------
# the MLP output matrix, keys and their second moment


def _check_layer(lm, layer: int) -> None:
    L = lm.cfg.n_layers
    if not isinstance(layer, int) or not 0 <= layer < L:
        raise ValueError(f"The 'layer' parameter must be an int in [0, {L}) for this {L}-layer model. Got {layer!r} "
                         "instead.")


def key_second_moment(lm, texts: Sequence[str], layer: int, batch_size: int = 128) -> torch.Tensor:
    """Uncentred second moment ``C = E[k k^T]`` (float64 ``[d_mlp, d_mlp]``, CPU) of the MLP keys of ``layer`` over
    every real token of ``texts`` (tokenized by the handle's BOS policy; padding masked by length; accumulated
    batch by batch, so memory is one batch plus ``C``). ``C.count`` holds the number of tokens."""
    lm = _lm(lm)
    require_eval(lm.model, "Key statistics")
    _check_layer(lm, layer)
    if not texts:
        raise ValueError("No texts given for the key statistics.")
    site = KEY.format(layer)
    C, n = None, 0
    for s in range(0, len(texts), batch_size):
        toks, lens = lm.batch(texts[s:s + batch_size])
        mask = lm.mask(lens, toks.shape[1])
        got = {}
        with torch.no_grad(), hooks(lm.model, {site: lambda x: got.__setitem__("k", x.detach())}):
            lm.logits(toks)
        k = got["k"][mask.to(got["k"].device)].double().cpu()
        C = k.T @ k if C is None else C + k.T @ k
        n += len(k)
    C = C / n
    C.count = n
    return C


# ---------------------------------------------------------------------------------------------------------------
# value optimisation (shared by ROME and MEMIT)


def _optimize_target(lm, req: Request, site: str, cfg: EditConfig) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """``(h + delta, diagnostics, h)``: the representation at ``site`` (subject's last token) that makes the model
    predict ``req.target_new``, and the one it started from. The logits are the model's own (kmeng01/rome's
    ``v_loss_layer`` is the last layer: ``diagnostics["v_loss_layer"]``)."""
    model, dev = lm.model, lm.device
    tgt = lm.target_ids(req.target_new, req.text)
    rewrite = [c.format(req.prompt) for c in cfg.context_templates]
    prompts = rewrite + list(cfg.kl_prompts)
    seqs, look, starts = [], [], []
    for i, p in enumerate(prompts):
        ids = lm.encode(p.format(req.subject))
        look.append(subject_last_index(lm, p, req.subject))
        starts.append(len(ids))
        seqs.append(ids + (tgt[:-1] if i < len(rewrite) else []))
    toks, _ = lm.pad(seqs)
    toks = toks.to(dev)
    rows, look_t = torch.arange(len(prompts), device=dev), torch.tensor(look, device=dev)
    nr, nt = len(rewrite), len(tgt)
    pred_pos = torch.tensor([[starts[i] - 1 + j for j in range(nt)] for i in range(nr)], device=dev)  # [nr, nt]
    tgt_t = torch.tensor(tgt, device=dev)
    kl_rows = torch.arange(nr, len(prompts), device=dev)

    delta = torch.zeros(model.cfg.d_model, requires_grad=True, device=dev)
    state = {"h": None}

    def add_delta(out):
        if state["h"] is None:
            state["h"] = out[0, look_t[0]].detach().clone()
        out = out.clone()
        out[rows, look_t] = out[rows, look_t] + delta.to(out.dtype)
        return out

    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    kl_init, losses = None, []
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)  # only delta is optimised
    try:
        for step in range(cfg.v_steps):
            opt.zero_grad()
            with hooks(model, {site: add_delta}):
                logits = model(toks).float()
            lp = torch.log_softmax(logits, -1)
            nll = -lp[torch.arange(nr, device=dev)[:, None], pred_pos, tgt_t[None]].mean(1).mean()
            kl_lp = lp[kl_rows, look_t[kl_rows]]
            if kl_init is None:
                kl_init = kl_lp.detach().clone()
            kl = F.kl_div(kl_init, kl_lp, log_target=True, reduction="batchmean")
            h_norm = state["h"].norm()
            loss = nll + cfg.kl_factor * kl + cfg.v_weight_decay * delta.norm() / h_norm ** 2
            losses.append((nll.item(), kl.item(), loss.item()))
            if loss.item() < cfg.early_stop or step == cfg.v_steps - 1:
                break
            loss.backward()
            opt.step()
            with torch.no_grad():
                max_norm = cfg.clamp_norm_factor * h_norm
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    h = state["h"].double().cpu()
    info = {"nll_start": losses[0][0], "loss_start": losses[0][2], "nll_end": losses[-1][0], "kl_end": losses[-1][1],
            "steps": len(losses), "delta_norm": delta.norm().item(), "h_norm": h.norm().item(),
            "target_tokens": len(tgt), "losses": [{"nll": a, "kl": b, "loss": c} for a, b, c in losses],
            "v_loss_layer": model.cfg.n_layers - 1}
    return h + delta.detach().double().cpu(), info, h


def _at_subject(lm, prompts: Sequence[tuple[str, str]], sites: Sequence[str]) -> list[torch.Tensor]:
    """Each site's output ``[n, d]`` (float64, CPU) at the subject's last token of each ``(prompt with {},
    subject)``, from one batched pass (:func:`memloc.hooks.capture`)."""
    toks, _ = lm.pad([lm.encode(p.format(subj)) for p, subj in prompts])
    pos = torch.tensor([subject_last_index(lm, p, subj) for p, subj in prompts])
    got = capture(lm.model, toks, list(sites), batch_size=len(toks))
    rows = torch.arange(len(prompts))
    return [got[site][rows, pos].double() for site in sites]


def _template_means(lm, reqs: Sequence[Request], sites: Sequence[str], cfg: EditConfig) -> list[torch.Tensor]:
    """Each site's output ``[n, d]`` at each request's subject's last token, averaged over the context templates."""
    prompts = [(c.format(r.prompt), r.subject) for r in reqs for c in cfg.context_templates]
    return [x.view(len(reqs), len(cfg.context_templates), -1).mean(1) for x in _at_subject(lm, prompts, sites)]


def _mean_keys(lm, reqs: Sequence[Request], layer: int, cfg: EditConfig) -> torch.Tensor:
    """``[n, d_mlp]``: each request's key at the subject's last token, averaged over the context templates."""
    return _template_means(lm, reqs, [KEY.format(layer)], cfg)[0]


def _template_kv(lm, req: Request, layer: int, cfg: EditConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value at the subject's last token, each averaged over the context templates (r-ROME's ``k*`` and
    the mean current value ``W k* + b``)."""
    k, v = _template_means(lm, [req], [KEY.format(layer), VALUE.format(layer)], cfg)
    return k[0], v[0]


def context_templates(lm, length_params: Sequence[tuple[int, int]] = ((5, 10), (10, 10)), top_k: int = 5,
                      seed: int = 0, starts: Sequence[str] | None = None) -> tuple[str, ...]:
    """kmeng01/rome's context templates: ``"{}"`` and, per ``(length, n)`` of ``length_params``, ``n`` texts
    sampled from the model (top-``top_k`` sampling, seeded) of ``length`` tokens in all counting the start token,
    each followed by ``". {}"`` (braces in a text become spaces). ``starts=None`` starts from the BOS token
    (kmeng01/rome: ``<|endoftext|>``; defaults ``((5, 10), (10, 10))``: 21 templates); MEMIT and AlphaEdit start
    from ``["The", "Therefore", "Because", "I", "You"]`` with ``((10, 5),)``, ``n // len(starts)`` texts each.
    ROME averages the key over these prefixes (``EditConfig(context_templates=...)``); the value is optimised on
    all of them."""
    from ..validate import number

    lm = _lm(lm)
    require_eval(lm.model, "Context templates")
    number("top_k", top_k, lo=1, integer=True)
    gen = torch.Generator().manual_seed(int(seed))
    out = ["{}"]
    for length, n in length_params:
        number("length", length, lo=2, integer=True)
        number("n", n, lo=0, integer=True)
        if starts is None:
            if lm.bos_id is None:
                raise ValueError("The tokenizer has no BOS token to start the context templates from; give starts=.")
            seeds = [[lm.bos_id]] * n
        else:
            each = max(1, n // len(starts))
            seeds = [lm.encode(t, bos=False) for t in starts for _ in range(each)]
        if not seeds:
            continue
        width = max(len(q) for q in seeds)
        groups: dict[int, list[list[int]]] = {}
        for q in seeds:
            groups.setdefault(len(q), []).append(list(q))
        texts = []
        with torch.no_grad():
            for _, group in sorted(groups.items()):
                cur = torch.tensor(group, dtype=torch.long)
                while cur.shape[1] < max(length, width):
                    p = torch.softmax(lm.logits(cur)[:, -1].double().cpu(), -1)
                    top = torch.topk(p, min(top_k, p.shape[-1]), dim=-1)
                    pick = torch.multinomial(top.values / top.values.sum(-1, keepdim=True), 1, generator=gen)
                    cur = torch.cat([cur, top.indices.gather(1, pick)], 1)
                for row in cur.tolist():
                    ids = [i for i in row if i != lm.bos_id]
                    texts.append(lm.decode(ids) if ids else "")
        for t in texts:
            t = t.replace("{", " ").replace("}", " ").replace("\n", " ")
            out.append(t + ". {}")
    return tuple(out)


def _bare(lm, reqs: Sequence[Request], layer: int, site: str | None = None):
    """Key and value (or, with ``site``, that site's output) at the subject's last token of the bare prompts."""
    prompts = [(r.prompt, r.subject) for r in reqs]
    if site is None:
        return tuple(_at_subject(lm, prompts, [KEY.format(layer), VALUE.format(layer)]))
    return _at_subject(lm, prompts, [site])[0]


def _as_delta(upd: torch.Tensor, w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``upd`` is ``[d_model, d_mlp]`` (Linear orientation)."""
    return (upd.T if transposed else upd).to(device=w.device, dtype=w.dtype).contiguous()


def _continuation_entropy(lm, texts: Sequence[str]) -> float:
    """ROME's fluency measure (:func:`memloc.edit.evaluate.generation_entropy`) of greedy continuations."""
    from .evaluate import generation_entropy

    return generation_entropy(lm, texts)


def edit_outcomes(lm, edit: "Edit", requests: Sequence[Request], entropy: bool = True,
                  collapse_ratio: float = 0.5) -> list[dict]:
    """Did each request of ``edit`` take? Per request: ``nll_after`` (mean target NLL per token on the rewrite
    prompt, the edit applied), ``took`` (greedy decoding reproduces the new target), ``entropy_before`` /
    ``entropy_after`` (continuation entropy x100 of the rewrite prompt) and ``flag``: ``"did not take"``,
    ``"collapse"`` (entropy after < ``collapse_ratio`` x before: a disabling edit) or ``"ok"``."""
    texts, targets = [r.text for r in requests], [r.target_new for r in requests]
    before = [_continuation_entropy(lm, [t]) for t in texts] if entropy else [np.nan] * len(texts)
    with edit.applied(lm.model):
        s = lm.score(texts, targets)
        after = [_continuation_entropy(lm, [t]) for t in texts] if entropy else [np.nan] * len(texts)
    out = []
    for i in range(len(requests)):
        took = bool(s["exact"][i])
        collapse = entropy and before[i] > 0 and after[i] < collapse_ratio * before[i]
        out.append({"nll_after": float(-s["mean_logprob"][i]), "took": took, "entropy_before": before[i],
                    "entropy_after": after[i], "flag": "did not take" if not took else "collapse" if collapse else "ok"})
    return out


# ---------------------------------------------------------------------------------------------------------------
# ROME and MEMIT


def rome(lm, request: Request, layer: int, C: torch.Tensor | None = None, config: EditConfig | None = None,
         outcomes: bool = True) -> Edit:
    """A ROME edit of ``request`` at ``layer`` (see the module docstring). ``lm``: the :class:`~memloc.models.lm.LM`
    handle. ``C``: the layer's key second moment from :func:`key_second_moment`; ``None`` uses the identity. The
    model is not modified. With ``outcomes``, ``info`` says whether the edit took (:func:`edit_outcomes`).

    ``config.keys`` chooses the keys of ``W' = W + (v* - v) u^T / (k^T u)``, ``u = C^-1 k_u / |C^-1 k_u|``
    (``k*``: the key averaged over ``config.context_templates``; ``k``: the bare prompt's key; ``v``: the current
    value at the key used):

    - ``"original"`` (kmeng01/rome): ``k_u = k*``, residual and denominator from ``k``; the edited bare-prompt key
      maps to ``v*`` exactly. The asymmetry is what r-ROME (Gupta et al. 2024) found behind disabling edits.
    - ``"prefix"`` (r-ROME, scalable-model-editing/rebuilding-rome's ``enable_random_prefix_keys``): ``k*``
      everywhere and ``v`` the current value averaged over the templates (``W k* + b``): ``k*`` maps to ``v*``.
    - ``"prompt"`` (rebuilding-rome's ``enable_prompt_keys``): the bare prompt's key everywhere.

    With the default single template ``"{}"`` the three coincide; :func:`context_templates` generates
    kmeng01/rome's 20 prefixes."""
    lm = _lm(lm)
    model = lm.model
    require_eval(model, "ROME")
    _check_layer(lm, layer)
    _check_words(lm, [request])
    cfg = config or EditConfig()
    name, w, transposed = mlp_out_weight(model, layer)
    v_star, info, h = _optimize_target(lm, request, VALUE.format(layer), cfg)
    k_star, v_mean = _template_kv(lm, request, layer, cfg)
    k_bare, v_bare = (t[0] for t in _bare(lm, [request], layer))
    left = k_bare if cfg.keys == "prompt" else k_star
    c_inv_k = torch.linalg.solve(C.double(), left) if C is not None else left.clone()
    u = c_inv_k / c_inv_k.norm()
    k, v = (k_star, v_mean) if cfg.keys == "prefix" else (k_bare, v_bare)
    right = (v_star - v) / (k @ u)
    upd = torch.outer(right, u)
    edit = Edit({name: _as_delta(upd, w, transposed)}, {})
    with edit.applied(model):
        v_new = _template_kv(lm, request, layer, cfg)[1] if cfg.keys == "prefix" else _bare(lm, [request], layer)[1][0]
    W = (w.detach().double().cpu().T if transposed else w.detach().double().cpu())  # [d_model, d_mlp]
    typical = float(torch.sqrt(((W @ C.double()) * W).sum())) if C is not None else float("nan")
    info.update(method="rome" if cfg.keys == "original" else f"rome (keys={cfg.keys})", layer=layer, keys=cfg.keys,
                n_templates=len(cfg.context_templates), denominator=float(k @ u),
                covariance="data" if C is not None else "identity",
                rel_error=float((v_new - v_star).norm() / v_star.norm()), config=asdict(cfg), request=asdict(request),
                update_rel=float((v_star - v).norm() / v.norm()),
                update_vs_typical=float((v_star - v).norm()) / typical if C is not None else float("nan"),
                weight_rel=float(upd.norm() / W.norm()), tokenization=lm.settings)
    edit.info = info
    edit.intermediates = {"k_star": k_star, "c_inv_k": c_inv_k, "u": u, "key": k, "value": v, "h": h,
                          "delta": v_star - h, "v_star": v_star, "key_bare": k_bare, "value_bare": v_bare}
    if outcomes:
        info.update(edit_outcomes(lm, edit, [request])[0])
    return edit


def _check_words(lm, requests: Sequence[Request]) -> None:
    """With memloc's word tokenizer, a subject, target or prompt word outside the vocabulary would silently become
    ``<unk>`` (and the edit would rewrite ``<unk>``): refuse it, naming the words."""
    if not getattr(lm, "word", False):
        return
    from ..validate import ConfigError

    vocab = lm.tokenizer.index
    for r in requests:
        for what, text in (("subject", r.subject), ("target_new", r.target_new), ("prompt", r.prompt.replace("{}", ""))):
            unknown = [w for w in text.split() if w not in vocab]
            if unknown:
                raise ConfigError(f"The request's {what} {text!r} has word(s) {unknown} that are not in the model's "
                                  f"vocabulary ({len(vocab)} words, e.g. {list(vocab)[3:8]}); they would be edited as "
                                  "'<unk>'.")


def memit(lm, requests: Sequence[Request], layers: Sequence[int],
          C: dict[int, torch.Tensor] | None = None, config: EditConfig | None = None,
          progress: bool = False, outcomes: bool = True) -> Edit:
    """One MEMIT edit for all ``requests`` spread over ``layers`` (see the module docstring). ``C``: ``{layer:
    key second moment}``; missing layers use the identity. The model is not modified. With ``outcomes``,
    ``info["edits"]`` says per request whether it took, and ``info["flags"]`` counts the flags."""
    return _batch_edit(lm, requests, layers, C, config, None, progress, outcomes)


@dataclass
class NullSpace:
    """AlphaEdit's state per edited layer: ``P`` (``{layer: [d_mlp, d_mlp]}``, float64), the projector onto the
    span of the eigenvectors of the preserved keys' second moment ``C`` whose eigenvalues are below
    ``threshold``; ``previous`` (``{layer: K_p K_p^T}``), the keys of the edits made so far (summed outer
    products, keys computed after each batch was applied, as jianghoucheng/AlphaEdit does); ``dims``: the null
    space's dimension per layer; ``n_previous``: how many edits ``previous`` holds. Memory: two ``d_mlp x d_mlp``
    float64 matrices per layer (:meth:`nbytes`)."""

    P: dict
    previous: dict
    threshold: float
    dims: dict
    n_previous: int = 0

    def remember(self, edit: Edit) -> None:
        """Add the keys of an applied :func:`alphaedit` edit (``edit.intermediates["keys_after"]``)."""
        after = edit.intermediates.get("keys_after")
        if after is None:
            raise ValueError("This edit has no keys_after: only an alphaedit() edit can be remembered.")
        for l, K in after.items():
            self.previous[l] = self.previous[l] + K.T @ K
        self.n_previous += len(next(iter(after.values())))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.P, self.previous) for t in d.values())


def null_space(C: dict[int, torch.Tensor], threshold: float = 2e-2) -> NullSpace:
    """:class:`NullSpace` from ``{layer: C}`` (:func:`key_second_moment`): eigenvectors of ``C`` with eigenvalue
    below ``threshold`` (jianghoucheng/AlphaEdit's ``nullspace_threshold``, 2e-2 for GPT-2 XL, GPT-J and Llama3;
    an absolute threshold, so it depends on the scale of the model's keys: ``dims`` says how many directions
    are left free)."""
    from ..validate import number

    number("threshold", threshold, lo=0.0)
    if not C:
        raise ValueError("AlphaEdit needs the key second moment C of every edited layer ({layer: C}).")
    P, prev, dims = {}, {}, {}
    for l, c in C.items():
        c = c.double()
        evals, evecs = torch.linalg.eigh((c + c.T) / 2)
        free = evecs[:, evals < threshold]
        P[int(l)], prev[int(l)], dims[int(l)] = free @ free.T, torch.zeros_like(c), int(free.shape[1])
    return NullSpace(P, prev, float(threshold), dims)


def alphaedit(lm, requests: Sequence[Request], layers: Sequence[int], space: NullSpace,
              config: EditConfig | None = None, progress: bool = False, outcomes: bool = True) -> Edit:
    """One AlphaEdit batch (Fang et al. 2025): MEMIT's targets and residuals, with each layer's update
    ``Delta^T = (P (K K^T + K_p K_p^T) + l2 I)^-1 P K R^T`` restricted to the null space ``P`` of the preserved
    keys (``space`` from :func:`null_space`) and kept off the earlier edits' keys ``K_p`` (``space.previous``);
    ``config.l2`` is the ridge term (10), ``config.mom2_update_weight`` is not used. The update lies in the
    range of ``P``: preserved keys (eigenvalues of ``C`` above the threshold) map to what they mapped to.
    The model is not modified; apply the edit, then call ``space.remember(edit)`` before the next batch
    (:func:`memloc.edit.sequential.sequential_edits` does both)."""
    return _batch_edit(lm, requests, layers, None, config, space, progress, outcomes)


def _batch_edit(lm, requests, layers, C, config, space, progress, outcomes) -> Edit:
    """MEMIT (``space=None``) or AlphaEdit (``space``) over ``layers``."""
    from tqdm.auto import tqdm

    lm = _lm(lm)
    model = lm.model
    method, shown = ("memit", "MEMIT") if space is None else ("alphaedit", "AlphaEdit")
    require_eval(model, shown)
    cfg = config or EditConfig.memit()
    requests, layers = list(requests), sorted(int(l) for l in layers)
    _check_words(lm, requests)
    if not requests or not layers:
        raise ValueError(f"{shown} needs at least one request and one layer.")
    for l in layers:
        _check_layer(lm, l)
    if space is not None and set(layers) - set(space.P):
        raise ValueError(f"The null space covers layers {sorted(space.P)}; the edit asks for {layers}.")
    L = layers[-1]
    zs, infos, hs = [], [], []
    for r in tqdm(requests, desc=f"{shown} targets", disable=not progress, leave=False):
        z, info, h = _optimize_target(lm, r, RESID.format(L), cfg)
        zs.append(z)
        infos.append(info)
        hs.append(h)
    Z = torch.stack(zs)  # [n, d_model]
    deltas = {}
    inter = {"z": Z, "h": torch.stack(hs), "delta": Z - torch.stack(hs), "keys": {}, "current": {}, "residuals": {},
             "u": {}}
    with contextlib.ExitStack() as stack:
        for i, l in enumerate(layers):
            name, w, transposed = mlp_out_weight(model, l)
            K = _mean_keys(lm, requests, l, cfg).T  # [d_mlp, n]
            cur = _bare(lm, requests, l, RESID.format(L))  # [n, d_model]
            R = (Z - cur).T / (len(layers) - i)  # [d_model, n]
            if space is None:
                Cl = C.get(l) if C else None
                Cl = torch.eye(K.shape[0], dtype=torch.float64) if Cl is None else Cl.double()
                adj = torch.linalg.solve(cfg.mom2_update_weight * Cl + K @ K.T, K)  # [d_mlp, n]
                upd = R @ adj.T  # [d_model, d_mlp]
                inter["u"][l] = adj.T
            else:
                P = space.P[l]
                A = P @ (K @ K.T + space.previous[l]) + cfg.l2 * torch.eye(K.shape[0], dtype=torch.float64)
                upd = torch.linalg.solve(A, P @ K @ R.T).T  # [d_model, d_mlp]
            inter["keys"][l], inter["current"][l], inter["residuals"][l] = K.T, cur, R.T
            d = _as_delta(upd, w, transposed)
            deltas[name] = d
            stack.enter_context(Edit({name: d}).applied(model))
        final = _bare(lm, requests, L, RESID.format(L))
        if space is not None:
            inter["keys_after"] = {l: _mean_keys(lm, requests, l, cfg) for l in layers}
    info = {"method": method, "layers": layers, "n_requests": len(requests),
            "covariance": "data" if C else "identity", "config": asdict(cfg),
            "target_rel_error": float(((final - Z).norm(dim=1) / Z.norm(dim=1)).mean()),
            "nll_end": float(sum(i["nll_end"] for i in infos) / len(infos)), "tokenization": lm.settings,
            "losses": [i["losses"] for i in infos], "v_loss_layer": model.cfg.n_layers - 1}
    if space is not None:
        info.update(covariance="null space", nullspace_threshold=space.threshold,
                    nullspace_dims={str(l): space.dims[l] for l in layers}, previous_edits=space.n_previous)
    edit = Edit(deltas, info, inter)
    if outcomes:
        per = edit_outcomes(lm, edit, requests, entropy=len(requests) <= 32)
        for p_, i_ in zip(per, infos):
            p_["nll_end"] = i_["nll_end"]
        info["edits"] = per
        info["flags"] = {f: sum(p_["flag"] == f for p_ in per) for f in ("ok", "did not take", "collapse")}
    return edit
