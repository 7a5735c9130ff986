"""Knowledge neurons (Dai et al. 2022): integrated-gradient attribution of a fact to MLP hidden neurons.

For a prompt whose next token is the fact's object, the attribution of neuron ``i`` of layer ``l`` is the
integrated gradient of ``P(object)`` along the straight path from ``a_i = 0`` (zero baseline) to the neuron's actual
activation ``a_i`` at the prediction position (the prompt's last token), all other activations left as they are:
``attr_i = a_i * mean_k dP/da_i (alpha_k * a)``. The integral is delegated to captum's ``IntegratedGradients`` over
the activation vector, which is patched into the model through a hook on ``blocks.{l}.mlp.hook_post`` (the
post-activation hidden state that enters the MLP's output matrix). Every prompt of a batch and every integration
step run in one forward/backward pass.

Defaults follow Dai et al.'s code (20 steps, coarse neurons above ``threshold`` = 0.2 x the prompt's maximum
attribution over all attributed layers, refined neurons shared by at least ``share`` = 0.7 of the fact's prompts)
except the quadrature: captum's Gauss-Legendre rule (``method="gausslegendre"``) instead of Dai's left Riemann sum
(``method="riemann_left"``). On the testbed, where the model is confident (P ~ 0.98), the left Riemann sum misses
completeness by ~38% at 20 steps and ~15% at 50; Gauss-Legendre is within 0.01% at 50.
Completeness (IG's sum of attributions equals ``P(a) - P(a with the layer's activations at the position zeroed)``)
is reported per prompt as ``delta``.

Interventions (:func:`intervene_knowledge_neurons`) multiply the neurons' activations by 0 (suppress) or 2
(amplify) at every position, through :func:`memloc.hooks.scale_neurons`, and compare with as many random neurons of
the same layers.

``convention=`` selects whose exact rules apply (:data:`CONVENTIONS`; docs/conventions.md):

- ``"memloc"`` (default): as above.
- ``"eleutherai"`` (EleutherAI/knowledge-neurons, what most users run on GPT-2): the **pre-GELU** activation
  (``mlp.c_fc``'s output, ``blocks.{l}.mlp.hook_pre``); the path ``linspace(0, 1, steps)`` with equal weights
  ``1/steps`` (``method="linspace"``); coarse neurons have attribution **>** 0.3 x the prompt's maximum; refined
  neurons are coarse in **more than** ``p`` = 0.5 of the prompts; suppress / enhance act on the **last position
  only**, and their outcome is P(first object token) there.
- ``"dai"`` (Hunter-DDM/knowledge-neurons, Dai et al.'s own code): post-GELU; left Riemann sum of 20 points
  ``i / m``; coarse >= 0.2 x the maximum; refined: coarse in at least ``max(p x n_prompts, 3)`` prompts, with ``p``
  starting at 0.7 and moved by 0.05 (up to 6 rounds) per relation until a fact has 2-5 neurons on average;
  interventions at the last position only.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..hooks import hooks, require_eval, scale_neurons
from ..results import make_result

__all__ = ["MLP_HIDDEN", "MLP_PRE", "CONVENTIONS", "attribute", "attribution_scores", "coarse_neurons",
           "knowledge_neurons", "intervene_knowledge_neurons"]

MLP_HIDDEN = "blocks.{}.mlp.hook_post"  # after the activation function (what the output matrix reads)
MLP_PRE = "blocks.{}.mlp.hook_pre"  # before it (GPT-2's mlp.c_fc output)

CONVENTIONS = {
    "memloc": {"site": MLP_HIDDEN, "method": "gausslegendre", "steps": 20, "threshold": 0.2, "share": 0.7,
               "coarse": "attribution >= threshold x max", "refine": "coarse in >= share of the prompts",
               "position": "every"},
    "eleutherai": {"site": MLP_PRE, "method": "linspace", "steps": 20, "threshold": 0.3, "share": 0.5,
                   "coarse": "attribution > threshold x max", "refine": "coarse in > share x n_prompts prompts",
                   "position": "last"},
    "dai": {"site": MLP_HIDDEN, "method": "riemann_left", "steps": 20, "threshold": 0.2, "share": 0.7,
            "coarse": "attribution >= threshold x max",
            "refine": "coarse in >= max(p x n_prompts, 3) prompts; p from share, +-0.05 per relation (<= 6 rounds) "
                      "until 2-5 neurons per fact", "position": "last"},
}
_CAPTUM = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


def _convention(name: str) -> dict:
    if name not in CONVENTIONS:
        raise ValueError(f"The 'convention' parameter must be one of {sorted(CONVENTIONS)}. Got {name!r} instead.")
    return CONVENTIONS[name]


def _prob_fn(model, site: str):
    """``f(acts [R, d], tokens [R, T], last [R]) -> probs [R, vocab]`` with ``acts`` patched in at ``last``."""
    def f(acts, tokens, last):
        rows = torch.arange(len(tokens), device=tokens.device)

        def patch(out):
            out = out.clone()
            out[rows, last] = acts.to(out.dtype)
            return out
        with hooks(model, {site: patch}):
            logits = model(tokens)
        return torch.softmax(logits[rows, last].float(), -1)
    return f


def attribute(model, tokens: torch.Tensor, lengths: torch.Tensor, targets: Sequence[int], layer: int,
              steps: int = 20, method: str = "gausslegendre", batch_size: int = 32,
              site: str = MLP_HIDDEN) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrated-gradient attributions ``[N, d_mlp]`` of each prompt's target probability to the hidden neurons
    of ``layer`` at the prompt's last position, and the completeness error ``delta [N]`` (sum of attributions
    minus ``P(a) - P(0)``), as captum returns it.

    ``tokens`` are right-padded ``[N, T]`` prompts with ``lengths [N]``; ``batch_size`` prompts (each expanded to
    ``steps`` rows) share one forward/backward pass.
    """
    from captum.attr import IntegratedGradients

    from ..hooks import model_device

    require_eval(model, "Knowledge-neuron attribution")
    dev = model_device(model)
    if not isinstance(steps, int) or steps < 2:
        raise ValueError(f"The 'steps' parameter must be an int in [2, inf). Got {steps!r} instead.")
    if method not in _CAPTUM + ("linspace",):
        raise ValueError(f"The 'method' parameter must be one of {list(_CAPTUM + ('linspace',))}. Got {method!r} "
                         "instead.")
    site = site.format(layer)
    targets = torch.as_tensor(list(targets), dtype=torch.long).to(dev)
    tokens = torch.as_tensor(tokens).to(dev)
    last = (torch.as_tensor(lengths, dtype=torch.long) - 1).to(dev)
    if not (len(tokens) == len(targets) == len(last)):
        raise ValueError(f"tokens ({len(tokens)}), lengths ({len(last)}) and targets ({len(targets)}) must have "
                         "the same length.")
    acts = []
    with torch.no_grad(), hooks(model, {site: lambda out: acts.append(out.detach())}):
        for s in range(0, len(tokens), 256):
            model(tokens[s:s + 256])
    acts = torch.cat(acts)[torch.arange(len(tokens), device=dev), last].float()
    f = _prob_fn(model, site)
    ig = IntegratedGradients(f)
    attrs, deltas = [], []
    for s in range(0, len(tokens), batch_size):
        sl = slice(s, s + batch_size)
        if method == "linspace":
            a, d = _ig_linspace(f, acts[sl], targets[sl], tokens[sl], last[sl], steps)
        else:
            a, d = ig.attribute(acts[sl], baselines=torch.zeros_like(acts[sl]), target=targets[sl],
                                additional_forward_args=(tokens[sl], last[sl]), n_steps=steps, method=method,
                                return_convergence_delta=True)
        attrs.append(a.detach().cpu())
        deltas.append(d.detach().cpu())
    return torch.cat(attrs), torch.cat(deltas)


def _ig_linspace(f, acts, targets, tokens, last, steps: int):
    """EleutherAI/knowledge-neurons' quadrature (not one of captum's): gradients of the target probability at
    ``alpha * a`` for ``alpha`` in ``linspace(0, 1, steps)`` (both ends), summed and multiplied by ``a / steps``.
    Returns ``(attributions [n, d], completeness delta [n])``."""
    n, d = acts.shape
    alphas = torch.linspace(0, 1, steps).to(acts.device)
    x = (alphas[:, None, None] * acts[None]).reshape(steps * n, d).requires_grad_(True)
    rows = torch.arange(steps * n, device=acts.device)
    p = f(x, tokens.repeat(steps, 1), last.repeat(steps))[rows, targets.repeat(steps)]
    grad, = torch.autograd.grad(p.sum(), x)
    attr = grad.view(steps, n, d).sum(0) * acts / steps
    with torch.no_grad():
        r = torch.arange(n, device=acts.device)
        change = f(acts, tokens, last)[r, targets] - f(torch.zeros_like(acts), tokens, last)[r, targets]
    return attr, attr.sum(1) - change


def fact_prompt_sets(facts, split: str = "train") -> list[dict]:
    """``[{subject, relation, object, prompts}]``: a FactWorld's facts with their ``split`` prompts, or records
    (dicts) with ``prompts`` (a list; or one ``prompt``) and ``object`` (or ``target``)."""
    from ..data.facts import FactWorld

    if isinstance(facts, FactWorld):
        return [{"subject": f.subject, "relation": f.relation, "object": f.object, "prompts": facts.prompts(f, split)}
                for f in facts.facts]
    out = []
    for i, r in enumerate(facts):
        if not isinstance(r, dict):
            raise TypeError(f"Fact record {i} must be a dict with 'prompts' and 'object'; got {type(r).__name__}.")
        prompts = r.get("prompts") or ([r["prompt"]] if r.get("prompt") else None)
        obj = r.get("object", r.get("target"))
        if not prompts or obj is None:
            raise ValueError(f"Fact record {i} needs 'prompts' (or 'prompt') and 'object' (or 'target').")
        out.append({"subject": r.get("subject"), "relation": r.get("relation"), "object": obj,
                    "prompts": list(prompts)})
    return out


def _fact_prompts(facts) -> tuple[np.ndarray, list[str], list[str]]:
    """Every prompt of every fact: ``(fact index [P], prompts, objects)``."""
    rows = [(i, p, f["object"]) for i, f in enumerate(facts) for p in f["prompts"]]
    return np.array([r[0] for r in rows]), [r[1] for r in rows], [r[2] for r in rows]


def _check_layers(model, layers):
    L = model.cfg.n_layers
    layers = list(range(L)) if layers is None else [int(l) for l in layers]
    if not layers or any(not 0 <= l < L for l in layers):
        raise ValueError(f"layers must be in [0, {L}); got {layers}.")
    return layers


def attribution_scores(lm, prompts: Sequence[str], objects: Sequence[str], layers: Sequence[int] | None = None,
                       convention: str = "memloc", steps: int | None = None, method: str | None = None,
                       batch_size: int = 32, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrated-gradient scores ``[P, len(layers), d_mlp]`` of each prompt's next token being its object's first
    token (tokenized as :meth:`~memloc.models.lm.LM.target_ids`, with a leading space), at the prompt's last
    position, under ``convention``'s site and quadrature (``steps``, ``method`` override it); and the completeness
    errors ``[P, len(layers)]``. ``layers``: default every layer."""
    from tqdm.auto import tqdm

    from ..models.lm import as_lm

    lm = as_lm(lm)
    conv = _convention(convention)
    if len(prompts) != len(objects) or not prompts:
        raise ValueError(f"prompts ({len(prompts)}) and objects ({len(objects)}) must be non-empty and of the same "
                         "length.")
    layers = _check_layers(lm.model, layers)
    tokens, lengths = lm.batch(list(prompts))
    targets = [lm.target_ids(o, p)[0] for p, o in zip(prompts, objects)]
    attr, deltas = [], []
    for l in tqdm(layers, desc="knowledge neurons", disable=not progress, leave=False):
        a, d = attribute(lm.model, tokens, lengths, targets, l, steps or conv["steps"], method or conv["method"],
                         batch_size, site=conv["site"])
        attr.append(a)
        deltas.append(d)
    return torch.stack(attr, 1), torch.stack(deltas, 1)


def coarse_neurons(scores: torch.Tensor, threshold: float | None = None, convention: str = "memloc") -> torch.Tensor:
    """``[P, layers, d]`` bool: the coarse neurons of each prompt, attribution at least (``"memloc"``, ``"dai"``)
    or more than (``"eleutherai"``) ``threshold`` (default: the convention's) x the prompt's maximum over all
    layers scored."""
    conv = _convention(convention)
    t = (conv["threshold"] if threshold is None else threshold) * scores.flatten(1).max(1).values[:, None, None]
    return scores > t if convention == "eleutherai" else scores >= t


def _refine(counts: list[torch.Tensor], n: list[int], share: float, convention: str) -> tuple[list, float]:
    """Refined neurons of the facts of one relation from their coarse counts ``[layers, d]`` over ``n`` prompts.
    Returns the boolean masks and the share used."""
    if convention == "memloc":
        return [c / k >= share - 1e-9 for c, k in zip(counts, n)], share
    if convention == "eleutherai":
        return [c > k * share for c, k in zip(counts, n)], share
    ratio = share  # Dai et al.'s 2_get_kn.py, operation for operation
    for _ in range(6):
        kept = [c >= max(k * ratio, 3) for c, k in zip(counts, n)]
        used = ratio
        ave = sum(int(m.sum()) for m in kept) / len(kept)
        if ave < 2:
            ratio -= 0.05
        if ave > 5:
            ratio += 0.05
        if 2 <= ave <= 5:
            break
    return kept, used


def knowledge_neurons(lm, facts, layers: Sequence[int] | None = None, steps: int | None = None,
                      threshold: float | None = None, share: float | None = None, method: str | None = None,
                      batch_size: int = 32, split: str = "train", limit: int | None = None,
                      progress: bool = True, convention: str = "memloc") -> pd.DataFrame:
    """Refined knowledge neurons of each fact, from its prompts (a FactWorld's ``split`` templates, or records
    with ``prompts``, see :func:`fact_prompt_sets`; the first ``limit`` facts). The attributed probability is the
    object's first token's (Dai et al.'s objects are one token; EleutherAI's GPT-2 path accepts only one).

    ``convention`` (``"memloc"``, ``"eleutherai"``, ``"dai"``; see the module docstring and :data:`CONVENTIONS`)
    sets the site, quadrature, thresholds and refinement; ``steps``, ``method``, ``threshold`` and ``share``
    override its values. Per prompt, neurons whose attribution reaches ``threshold`` x the prompt's maximum over
    all ``layers`` (default: every layer) are coarse neurons (:func:`coarse_neurons`); a fact keeps those coarse in
    enough of its prompts (``share``; for ``"dai"`` the starting ``p`` of its per-relation adaptation). Returns rows
    ``subject, relation, object, layer, neuron, share, attribution`` (mean over the fact's prompts), one per kept
    neuron; settings include the convention, the prompts' mean completeness error relative to ``P(a) - P(0)``
    (``completeness_rel_error``), the mean number of neurons per fact, and for ``"dai"`` the share used per relation.
    """
    from ..models.lm import as_lm

    lm = as_lm(lm)
    model = lm.model
    conv = _convention(convention)
    threshold = conv["threshold"] if threshold is None else threshold
    share = conv["share"] if share is None else share
    steps, method = steps or conv["steps"], method or conv["method"]
    facts = fact_prompt_sets(facts, split)[:limit]
    if not facts:
        raise ValueError("No facts given.")
    if not 0 < threshold <= 1:
        raise ValueError(f"The 'threshold' parameter must be in (0, 1]. Got {threshold!r} instead.")
    if not (0 <= share < 1 if convention == "eleutherai" else 0 < share <= 1):
        raise ValueError(f"The 'share' parameter must be in {'[0, 1)' if convention == 'eleutherai' else '(0, 1]'} "
                         f"for convention {convention!r}. Got {share!r} instead.")
    layers = _check_layers(model, layers)
    fact_of, prompts, objects = _fact_prompts(facts)
    attr, deltas = attribution_scores(lm, prompts, objects, layers, convention, steps, method, batch_size, progress)
    coarse = coarse_neurons(attr, threshold, convention)
    keep, used = [None] * len(facts), {}
    by_relation: dict = {}
    for i, f in enumerate(facts):
        by_relation.setdefault(f["relation"], []).append(i)
    for rel, idx in by_relation.items():
        masks, used[str(rel)] = _refine([coarse[fact_of == i].sum(0) for i in idx],
                                        [int((fact_of == i).sum()) for i in idx], share, convention)
        for i, m in zip(idx, masks):
            keep[i] = m
    rows = []
    for i, f in enumerate(facts):
        sel = fact_of == i
        frac = coarse[sel].float().mean(0)
        mean_attr = attr[sel].mean(0)
        for li, n in torch.nonzero(keep[i]).tolist():
            rows.append({"subject": f["subject"], "relation": f["relation"], "object": f["object"], "layer": layers[li],
                         "neuron": n, "share": float(frac[li, n]), "attribution": float(mean_attr[li, n])})
    df = pd.DataFrame(rows, columns=["subject", "relation", "object", "layer", "neuron", "share", "attribution"])
    # completeness per layer: delta = sum(attr) - (P(a) - P(0)); relative to the output change
    change = attr.sum(2) - deltas
    rel_err = float((deltas.abs() / change.abs().clamp_min(1e-12)).mean())
    return make_result(df, convention=convention, site=conv["site"], coarse=conv["coarse"], refine=conv["refine"],
                       layers=layers, steps=steps, method=method, threshold=threshold, share=share,
                       share_used=used if convention == "dai" else None, split=split, n_facts=len(facts),
                       n_prompts=len(prompts), target="first token of the object",
                       neurons_per_fact=len(df) / len(facts), completeness_rel_error=rel_err, **lm.settings)


def _last_position_probs(lm, prompts: Sequence[str], targets: Sequence[int], spec: dict | None = None,
                         factor: float = 1.0) -> np.ndarray:
    """P(target) at each prompt's last position, with ``spec``'s neurons (``{site: indices}``) multiplied by
    ``factor`` at that position only (EleutherAI's and Dai's interventions)."""
    toks, lens = lm.batch(list(prompts))
    dev = lm.device
    rows, last = torch.arange(len(prompts), device=dev), (lens - 1).to(dev)
    fns = {}
    for site, idx in (spec or {}).items():
        def fn(out, idx=torch.as_tensor(idx, dtype=torch.long, device=dev)):
            out = out.clone()
            r, t = rows[:, None], last[:, None]
            out[r, t, idx[None]] = out[r, t, idx[None]] * factor
            return out
        fns[site] = fn
    with torch.no_grad(), hooks(lm.model, fns) if fns else contextlib.nullcontext():
        logits = lm.logits(toks.to(dev))
    p = torch.softmax(logits[rows, last].float(), -1)
    return p[rows, torch.as_tensor(list(targets), device=dev)].double().cpu().numpy()


def intervene_knowledge_neurons(lm, facts, neurons: pd.DataFrame, factor: float = 0.0,
                                n_unrelated: int = 5, split: str = "train", seed: int = 0,
                                convention: str | None = None) -> pd.DataFrame:
    """Scale each fact's knowledge neurons by ``factor`` (0 suppresses, 2 amplifies) and measure, per fact:
    the mean probability of its object on its own prompts before (``p_before``) and after (``p_after``), the same
    with as many random neurons drawn from the same layers (``p_random``), and the mean relative change on
    ``n_unrelated`` facts of other relations (``unrelated_change``). Relative changes are ``(after - before) /
    before``. Facts without knowledge neurons are skipped. ``facts``: a FactWorld or records, as for
    :func:`knowledge_neurons` (with ``subject`` and ``relation``).

    ``convention`` (default: the one ``neurons`` were found with): ``"memloc"`` scales the post-activation neurons
    at every position and scores the whole object; ``"eleutherai"`` (pre-GELU) and ``"dai"`` (post-GELU) scale
    them at the prompt's last position only and score the object's first token there, as those references do.
    """
    from ..models.lm import as_lm

    lm = as_lm(lm)
    model = lm.model
    require_eval(model, "Knowledge-neuron intervention")
    convention = convention or neurons.attrs.get("settings", {}).get("convention", "memloc")
    conv = _convention(convention)
    rng = np.random.default_rng(seed)
    d_mlp = model.cfg.d_mlp
    by_fact = {k: g for k, g in neurons.groupby(["subject", "relation"])}
    records = fact_prompt_sets(facts, split)
    index = {(f["subject"], f["relation"]): f for f in records}
    missing = [k for k in by_fact if k not in index]
    if missing:
        raise ValueError(f"Knowledge neurons of facts not given (subject, relation): {missing[:3]}.")
    rows = []

    if conv["position"] == "every":
        def probs(prompts, objects, spec=None):  # P(whole object) after each prompt
            with scale_neurons(model, spec, factor) if spec else contextlib.nullcontext():
                return np.exp(lm.score(prompts, objects)["logprob"])
    else:
        def probs(prompts, objects, spec=None):  # P(first object token) at the last position
            targets = [lm.target_ids(o, p)[0] for p, o in zip(prompts, objects)]
            return _last_position_probs(lm, prompts, targets, spec, factor)

    for key, g in by_fact.items():
        f = index[key]
        others = [x for x in records if x["relation"] != f["relation"] and x["subject"] != f["subject"]]
        unrelated = [others[i] for i in rng.choice(len(others), size=min(n_unrelated, len(others)), replace=False)]
        prompts = list(f["prompts"])
        u_prompts = [p for u in unrelated for p in u["prompts"]]
        u_objs = [u["object"] for u in unrelated for _ in u["prompts"]]
        all_p, all_o = prompts + u_prompts, [f["object"]] * len(prompts) + u_objs
        spec = {conv["site"].format(l): gl.neuron.tolist() for l, gl in g.groupby("layer")}
        rand = {}
        for site, idx in spec.items():
            pool = np.setdiff1d(np.arange(d_mlp), idx)
            rand[site] = rng.choice(pool, size=len(idx), replace=False).tolist()
        before = probs(all_p, all_o)
        after = probs(all_p, all_o, spec)
        random_ = probs(prompts, [f["object"]] * len(prompts), rand)
        n = len(prompts)
        pb, pa, pr = before[:n].mean(), after[:n].mean(), random_.mean()
        rows.append({"subject": f["subject"], "relation": f["relation"], "n_neurons": len(g), "p_before": pb,
                     "p_after": pa, "p_random": pr, "change": (pa - pb) / pb, "random_change": (pr - pb) / pb,
                     "unrelated_change": float(np.mean((after[n:] - before[n:]) / before[n:])) if len(after) > n
                     else float("nan")})
    scope = ("activations scaled at every position; P(whole object)" if conv["position"] == "every" else
             "activations scaled at the prompt's last position only; P(first object token) there")
    return make_result(pd.DataFrame(rows), factor=factor, n_unrelated=n_unrelated, split=split, seed=seed,
                       convention=convention, site=conv["site"], scope=scope, **lm.settings)
