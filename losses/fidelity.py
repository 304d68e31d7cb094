"""How each named point compares with its official code, as data (issue #14).

`FIDELITY[name]` names the official repository, the commit and files read, what agrees exactly
(checked by tests/losses/test_fidelity.py against references written from the official
formulas), and every deviation with the parameter that selects the other behaviour (None where
no parameter exists, with the reason). `USER_FACTS` are places where the public code is wrong
and ours is not. `python -m marginsearch.losses --fidelity [--markdown]` prints the table;
docs/fidelity.md is its Markdown.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Deviation", "Fidelity", "FIDELITY", "USER_FACTS", "COMMON", "fidelity_text", "fidelity_markdown"]


@dataclass(frozen=True)
class Deviation:
    """One difference between the named point at its defaults and another formula (official or paper)."""

    what: str
    parameter: str | None   # the named parameter (value) that selects the other behaviour, or None
    why: str


@dataclass(frozen=True)
class Fidelity:
    """The record of one named point against its official code."""

    official: str                 # repository, or "none"
    commit: str
    files: tuple[str, ...]
    agrees: tuple[str, ...]
    deviations: tuple[Deviation, ...] = ()


CLAMP = Deviation(
    "cos θ_y is clamped to ±(1 − 1e-7) before acos: at cos θ_y = 1 exactly the ArcFace target logit is "
    "s·cos(4.5e-4 + m), 0.014 below s·cos m at s = 64, m = 0.5",
    None, "finite gradients (≈ 2.2e3) instead of the official code's inf/NaN at cos = ±1; no effect elsewhere")

COMMON = ("Every head computes cosines and the loss in float32 (float64 for float64 inputs); the target cosine is "
          "clamped to [−1, 1]; negatives are not clamped unless `cos_clamp` > 0. Pure cosine margins "
          "(m1 = 1, m2 = 0) are computed as cos θ − m3 without acos. The angular points share the clamp "
          "deviation stated below.")

ISF = "deepinsight/insightface"
SVX = "xiaoboCASIA/SV-X-Softmax"

_MV_AM_AGREES = (
    "defaults s = 32, m = 0.35 (cosine units), t = 0.2, adaptive rule (t + 1)·cos θ_j + t (FC fc_type='MV-AM')",
    "easy margin on (easy_margin=True, guard 'easy-all'): target cos θ_y − m where cos θ_y > 0, else cos θ_y",
    "mis-classified j: cos θ_j > cos θ_y − m, the raw margin formula even where the easy margin kept cos θ_y "
    "(mask_against='margin')",
)
_MV_AM_DEV = (
    Deviation("the paper's indicator compares with the target actually used", "mask_against='target'",
              "the official code compares with the raw margin formula"),
    Deviation("no easy margin (the paper's target cos θ_y − m everywhere)", "easy_margin=False", "paper formula"),
    Deviation("the fixed rule cos θ_j + t (only a commented line in the official code)", "adaptive=False",
              "MV-Softmax paper's second variant"),
    Deviation("FaceX-Zoo's copy uses t = 0.12 (mv_weight 1.12) and an easy threshold m instead of 0",
              "t=0.12 (the threshold m is not a point)", "a third-party copy, not the official code"),
)
_MV_ARC_AGREES = (
    "defaults s = 32, m = 0.35 rad, t = 0.2, adaptive rule (FC fc_type='MV-Arc')",
    "easy margin (guard 'easy'): cos(θ_y + m) where cos θ_y > 0, else cos θ_y",
    "mis-classified j: cos θ_j > cos(θ_y + m), raw, also where the easy margin kept cos θ_y (mask_against='margin')",
)
_MV_ARC_DEV = (
    Deviation("the paper's indicator compares with the target actually used", "mask_against='target'",
              "the official code compares with the raw cos(θ_y + m)"),
    Deviation("official easy_margin=False: plain cos(θ_y + m) with no fallback past π", "guard='none'",
              "the official non-default branch"),
    CLAMP,
)

FIDELITY: dict[str, Fidelity] = {
    "normface": Fidelity(
        "happynear/NormFace (Caffe)", "not read", (),
        ("s·cos θ_y on normalised features and centres: the formula of the paper",),
        (Deviation("the official NormFace learns s (initial value 10)", "MarginSpec(learnable_scale=True, s=10)",
                   "the named point fixes s = 64; its official code was not read here"),)),
    "cosface": Fidelity(
        ISF, "7fadd420c2351d0ffa8cac403421c1a3ed733365",
        ("recognition/arcface_mxnet/train.py", "recognition/arcface_mxnet/sample_config.py",
         "recognition/arcface_torch/losses.py"),
        ("target s·(cos θ_y − m), m = 0.35 cosine units, s = 64 (mxnet sample_config 'cosface'), exact: no acos",),
        (Deviation("insightface's torch CosFace class defaults to m = 0.40", "m=0.4", "its torch configs' value"),)),
    "arcface": Fidelity(
        ISF, "b774d6a1^ (src/train_softmax.py, the paper's code); torch head at 7fadd420 (last touched 9097cd7b)",
        ("src/train_softmax.py (loss_type 4)", "recognition/arcface_torch/losses.py",
         "recognition/arcface_torch/partial_fc_v2.py"),
        ("defaults s = 64, m = 0.5 rad, full gradient (the paper's mxnet code)",
         "non-easy fallback: cos θ_y − m·sin m (= sin(π − m)·m) where θ_y + m > π (cos θ_y < cos(π − m))",),
        (Deviation("insightface's current torch head: margin under no_grad (straight-through gradient) and no "
                   "θ + m > π guard (its cos_m/th/mm attributes are dead)", "straight_through=True, guard='none'",
                   "the torch code since 657ae30e (Dec 2022)"),
         Deviation("easy margin of the mxnet code (easy_margin=1)", "guard='easy'", "an official option"),
         Deviation("at θ_y = π − m exactly ours applies cos(θ_y + m), the mxnet code the fallback", None,
                   "a single point (measure zero)"),
         CLAMP)),
    "combined": Fidelity(
        ISF, "7fadd420c2351d0ffa8cac403421c1a3ed733365", ("recognition/arcface_mxnet/train.py",
                                                          "recognition/arcface_mxnet/sample_config.py"),
        ("target cos(m1·θ_y + m2) − m3 with full gradient and no guard past π (guard='none')",
         "defaults s = 64, (m1, m2, m3) = (1, 0.3, 0.2) (sample_config 'combined')"),
        (Deviation("f decreasing past π (ArcFace fallback)", "guard='fallback'", "the previous default; not official"),
         CLAMP)),
    "sphereface": Fidelity(
        "wy1iu/sphereface (Caffe)", "966c44c90511c7c88aab1af066bc69eb569e907f",
        ("tools/caffe-sphereface/src/caffe/layers/margin_inner_product_layer.cpp",
         "train/code/sphereface/sphereface_model.prototxt"),
        ("ψ(θ) = (−1)^k cos(mθ) − 2k, m = 4, target (ψ + λ cos θ_y)/(1 + λ)",
         "λ = max(5, 1000·(1 + 0.12·iter)^−1) with iter incremented before λ: step 1 uses iter = 1 "
         "(lambda_step='current')"),
        (Deviation("λ one step behind (the steps before this one)", "lambda_step='previous'", "the previous default"),
         Deviation("logits scaled by s on normalised features; the official layer multiplies by |x|", None,
                   "the unified space scales by s; a per-sample |x| scale is not a point of it"),
         Deviation("true gradient; the Caffe backward rescales the target coefficients to unit norm and gives "
                   "the centres a plain inner-product gradient", None, "an approximation not worth reproducing"),
         Deviation("clcarwin's PyTorch port anneals 1500/(1 + 0.1·it)", "base=1500, gamma=0.1",
                   "a port, not the official code"),
         CLAMP)),
    "mv-am": Fidelity(SVX, "de3a82d7b68879ddbd653a733fe2917a4840826a", ("fc_layers.py",), _MV_AM_AGREES, _MV_AM_DEV),
    "mv-arc": Fidelity(SVX, "de3a82d7b68879ddbd653a733fe2917a4840826a", ("fc_layers.py",), _MV_ARC_AGREES,
                       _MV_ARC_DEV),
    "sv-am": Fidelity(SVX, "de3a82d7b68879ddbd653a733fe2917a4840826a", ("fc_layers.py",),
                      _MV_AM_AGREES + ("t_SV = t_MV + 1: the same point as mv-am",), _MV_AM_DEV[:2]),
    "sv-arc": Fidelity(SVX, "de3a82d7b68879ddbd653a733fe2917a4840826a", ("fc_layers.py",),
                       _MV_ARC_AGREES + ("t_SV = t_MV + 1: the same point as mv-arc",), _MV_ARC_DEV),
    "curricularface": Fidelity(
        "HuangYG123/CurricularFace", "d3802651f9672ae4ac0d09235c292252ba53a364", ("head/metrics.py",),
        ("defaults s = 64, m = 0.5 rad; t starts at 0, t ← 0.01·mean cos θ_y + 0.99·t before use",
         "hard negatives j: cos θ_j > cos(θ_y + m) raw, before the fallback (mask_against='margin'), "
         "transformed to cos θ_j·(t + cos θ_j) with the new t",
         "target cos(θ_y + m), fallback cos θ_y − m·sin m where cos θ_y ≤ cos(π − m)"),
        (Deviation("the paper's mask against the target used (θ_y > π − m marks fewer negatives hard)",
                   "mask_against='target'", "the previous default"),
         CLAMP)),
    "kappaface": Fidelity(
        "Leminhbinh0209/KappaFace", "4f9a51ba2ab8c12f64dd8eb8fd8099bfd29e90eb",
        ("losses.py", "momentum_head.py", "memory.py", "configs/base.py"),
        ("target cos(θ_y + m0·ψ_y), m0 = 0.8 rad, s = 64, full gradient, no guard past π (guard='none')",
         "ψ = γ·(1 − sigmoid(T·κ̃)) + (1 − γ)·(cos(π n/K) + 1)/2, T = 0.4, γ = 0.7 on the concentration term, "
         "K = 1.05·max n, κ̃ z-scored with the unbiased std; ψ = 1 in epoch 0, recomputed at each epoch end",
         "r̄ not clamped, κ = +∞ replaced by the largest other κ, NaN by 0 (r_max=None)"),
        (Deviation("r̄ clamped to 0.999 (ψ of a one-sample class differs by up to 0.15)", "r_max=0.999",
                   "the previous default"),
         Deviation("f decreasing past π", "guard='fallback'", "the previous default"),
         Deviation("class statistics: this model's normalised features summed over the epoch; the official "
                   "default sums a momentum encoder's features (EMA 0.9 of the parameters)", None,
                   "the trainer keeps no momentum encoder"),
         Deviation("n_c = samples seen this epoch (official: the dataset's count), d = feature dimension "
                   "(official: 512), classes unseen this epoch keep ψ", None,
                   "equal when every sample is seen once per epoch and d = 512"),
         CLAMP)),
    "search-softmax": Fidelity(
        "tiandunx/loss_function_search", "208ff0bcfa21938d29bce7482035a271f9691a82",
        ("lfs_core/utils/loss.py", "lfs_core/loss_func_search.py", "fc/fc_layers.py"),
        ("p_m = p/(a·p + 1 − a) with a = a0·e^{s/3}, default a0 = −1 (a = −e^{s/3}), s = 32: our `a` is the "
         "official A (loss values equal)",
         "local space: one a per bin of p (pass the ten official a_j·e^{s/2} as `a`)"),
        (Deviation("local space: at a bin edge p = j/10 exactly ours takes bin j, the official loop bin j − 1",
                   None, "a single point per edge (measure zero)"),
         Deviation("per-sample gradient; the official global loss multiplies each sample's gradient by its "
                   "label's multiplicity in the batch (B × B gather)", None, "the official code is wrong"),
         Deviation("stable −log p_m = CE + log(1 − a(1 − p)); the official log(softmax(·)) underflows at large s",
                   None, "numerics only"))),
    "random-softmax": Fidelity(
        "tiandunx/loss_function_search", "208ff0bcfa21938d29bce7482035a271f9691a82", ("lfs_core/utils/loss.py",),
        ("the paper's formula: a = −|x|·e^{s/3}, x ~ N(0, σ = 0.2), drawn each step",),
        (Deviation("the official Random-Softmax path cannot run (loss_random called with 2 of 3 arguments, "
                   "softmax applied twice)", None, "nothing to reproduce"),
         Deviation("eval uses E|x| = σ·√(2/π)", None, "our convention; the official code has no eval path"))),
    "am-lfs": Fidelity(
        "none (no official code)", "-", (),
        ("the paper's piecewise-linear target transform on equal intervals of cos θ_y ∈ [−1, 1]",),
        (Deviation("the probability transform τ of the paper is not implemented", None,
                   "only the logit transform t is a point of this space"),)),
    "elasticface-arc": Fidelity(
        "fdbtrs/ElasticFace", "ea2c5af079d5a6062fd7b1d714befc5b26113c6a", ("utils/losses.py", "config/config.py"),
        ("m_i ~ N(0.5, 0.05) rad per sample per step, unclamped, s = 64, cos(θ_y + m_i) with full gradient, "
         "no guard past π (guard='none')",),
        (Deviation("f decreasing past π", "guard='fallback'", "the previous default"),
         Deviation("the class default σ = 0.0125 (config and paper: 0.05)", "sigma=0.0125", "unused by the paper"),
         Deviation("ElasticFace+ (sorted margins) is not implemented; its official assignment gathers by the sort "
                   "permutation instead of its inverse (not monotone)", None, "not a point of this space"),
         CLAMP)),
    "elasticface-cos": Fidelity(
        "fdbtrs/ElasticFace", "ea2c5af079d5a6062fd7b1d714befc5b26113c6a", ("utils/losses.py", "config/config.py"),
        ("m_i ~ N(0.35, 0.05) cosine units per sample per step, target cos θ_y − m_i, s = 64 (exact: no acos)",),
        (Deviation("ElasticCosFace+ is not implemented", None, "not a point of this space"),)),
    "adaface": Fidelity(
        "mk-minchul/AdaFace", "9cb981642eb7b579487bfadb0ee9ad8fc3772b74",
        ("head.py", "config.py", "scripts/run_ir50_ms1mv2.sh"),
        ("m = 0.4, h = 0.333, s = 64, t_alpha = 0.01 (the run script); μ, σ start at 20 and 100, EMA of the "
         "clipped, detached norms with the unbiased std, before use",
         "every cosine clamped to ±(1 − 1e-3) (cos_clamp=1e-3), θ_m clipped to [1e-3, π − 1e-3] (guard 'clip'), "
         "target cos(θ_m) − (m + m·ẑ)"),
        (Deviation("no cosine clamp (the paper's formula)", "cos_clamp=0.0", "the previous default"),
         Deviation("the class and argparse defaults (t_alpha = 1, h = 0, m = 0.5) are not the paper's run",
                   "t_alpha=1.0, h=0.0, m=0.5", "the run script's values are the published ones"))),
    "magface": Fidelity(
        "IrvingMeng/MagFace", "99bae614ac2643b9694bf18e0c5645272ff6acfa",
        ("models/magface.py", "run/trainer.py", "run/run.sh"),
        ("a = clamp(|x|, 10, 110), m(a) linear from 0.45 to 0.8 rad, s = 64, λ_g = 35 (run.sh), "
         "g(a) = a/u_a² + 1/a averaged over the batch",
         "easy margin (MagLinear easy_margin=True, guard 'easy'): cos(θ_y + m(a)) where cos θ_y > 0, else cos θ_y"),
        (Deviation("the paper's margin everywhere, with the ArcFace fallback past π", "guard='fallback'",
                   "the previous default"),
         Deviation("the argparse default λ_g = 20 violates the code's own bound (≈ 22.6)", "lambda_g=20.0",
                   "the run scripts use 35"),
         CLAMP)),
}

USER_FACTS: tuple[str, ...] = (
    "insightface's torch CombinedMarginLoss ignores m1 and m2 whenever m3 > 0 (it is CosFace with m3) and "
    "raises for m1 ≠ 1 with m3 = 0; `named('combined')` computes cos(m1·θ + m2) − m3 as its mxnet code does.",
    "The official Search-Softmax global loss multiplies each sample's gradient by the number of batch samples "
    "sharing its label (a B × B gather); its loss values are right. Ours has the per-sample gradient.",
    "The clamp of cos θ_y to ±(1 − 1e-7) before acos changes the ArcFace target logit at cos θ_y = 1 exactly "
    "by −0.014 (s = 64, m = 0.5) and keeps its gradient finite where the official code gives inf/NaN.",
)


def _param(d: Deviation) -> str:
    return d.parameter if d.parameter is not None else "no parameter"


def fidelity_text() -> str:
    """The table as plain text."""
    blocks = [COMMON]
    for name, f in FIDELITY.items():
        lines = [name, f"  official: {f.official} @ {f.commit}"]
        if f.files:
            lines.append(f"  read    : {', '.join(f.files)}")
        lines += [f"  agrees  : {a}" for a in f.agrees]
        lines += [f"  differs : {d.what} [{_param(d)}; {d.why}]" for d in f.deviations]
        blocks.append("\n".join(lines))
    blocks.append("Public code wrong, ours right:\n" + "\n".join(f"  - {fact}" for fact in USER_FACTS))
    return "\n\n".join(blocks)


def fidelity_markdown() -> str:
    """The table as Markdown (docs/fidelity.md)."""
    out = ["# Fidelity: every named point against its official code", "",
           "Generated by `python -m marginsearch.losses --fidelity --markdown` from `losses/fidelity.py`; "
           "each agreement is checked by `tests/losses/test_fidelity.py` against references written from the "
           "official formulas. Each named point defaults to its official code's flavour; every deviation names "
           "the parameter that selects it.", "", COMMON, ""]
    for name, f in FIDELITY.items():
        out += [f"## `{name}`", "", f"Official: {f.official} @ `{f.commit}`"
                + (f"; read {', '.join(f'`{p}`' for p in f.files)}" if f.files else ""), "",
                "Agrees exactly:", ""]
        out += [f"- {a}" for a in f.agrees]
        if f.deviations:
            out += ["", "| deviation | parameter | why |", "|---|---|---|"]
            out += [f"| {d.what} | {'`' + d.parameter + '`' if d.parameter else '—'} | {d.why} |"
                    for d in f.deviations]
        out.append("")
    out += ["## Public code wrong, ours right", ""] + [f"- {fact}" for fact in USER_FACTS]
    return "\n".join(out) + "\n"
