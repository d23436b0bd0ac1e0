"""Question 1: how fast are salmap's methods next to pytorch-grad-cam and Captum, and next to
the bare model (forward-only, forward + input-gradient backward)?

Same model object, same batch, same targets, same device, same target layer, measured
round-robin in one process (:func:`bench.timing.measure`: on a CPU the CPU seconds of this
process with one torch thread, on CUDA wall time). Outputs are what each library
returns, no conversion: salmap gives raw ``[B,h,w]`` tensors (CAM maps at the target layer's
resolution); pytorch-grad-cam gives min-max normalised maps upsampled to the input size as a
numpy array (its upsampling, scaling and device->host copy are part of its time); Captum
gives raw ``[B,3,H,W]`` attributions (no channel reduction).

Fairness rules:
  * the model's parameters require grad, as a user's model normally does (pytorch-grad-cam
    needs it: with frozen parameters and an input that does not require grad its backward has
    nothing to differentiate); salmap freezes them for the duration of its own call;
  * iterative methods use the same number of steps / samples and the same chunk size
    (salmap ``inner_batch_size`` = Captum ``internal_batch_size`` / ``nt_samples_batch_size``);
  * Score-CAM: salmap ``variant="jacobgil"`` forwards every channel, like pytorch-grad-cam
    (1 + K forwards per image for both), chunk size = pytorch-grad-cam ``batch_size``. To keep
    a CPU run short it uses a target layer with fewer channels than the CAM default and one
    image (``--scorecam-batch``, ``--scorecam-layer``);
  * EfficientNet-Lite0: its default CAM layer ``_swish`` is a module called twice per forward
    (stem and head). salmap keeps the last call, pytorch-grad-cam the first, so for a like-for-
    like comparison the head BatchNorm is wrapped as ``Sequential(_bn1, ReLU6())`` and both
    libraries use ``_bn1.1`` (same values as the last ``_swish`` call; one extra ReLU6).

    PYTHONPATH=. python bench/methods_vs_peers.py                       # CPU-friendly defaults
    PYTHONPATH=. python bench/methods_vs_peers.py --device cuda --steps 50 --samples 25 \\
        --repeats 5 --scorecam-layer default --scorecam-batch 8
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam's ScoreCAM prints tqdm bars
warnings.filterwarnings("ignore", category=UserWarning, module="captum")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.common import base_parser, inputs, load_avg, load_bench_model, table  # noqa: E402
from bench.timing import measure, parse_timed_args  # noqa: E402

CAM = ("gradcam", "gradcam_pp", "layercam")
GRADIENT = ("gradient", "guided_backprop")
ITERATIVE = ("integrated_gradients", "smoothgrad")
ALL = (*CAM, "scorecam", *GRADIENT, *ITERATIVE)
SCORECAM_LAYER = {"resnet50": "relu", "lite0": "_blocks.3", "resnet18": "relu"}


def prepare_model(name: str, device: torch.device) -> tuple[nn.Module, str]:
    """The bench model with trainable-looking parameters and a CAM layer called once."""
    model, layer = load_bench_model(name, device)
    if name == "lite0":
        model._bn1 = nn.Sequential(model._bn1, nn.ReLU6())
        layer = "_bn1.1"
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model, layer


def floors(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The bare model: forward only, and forward + backward to the input (frozen parameters)."""
    params = list(model.parameters())

    def fwd() -> object:
        with torch.no_grad():
            return model(x)

    def fwd_bwd() -> object:
        for p in params:
            p.requires_grad_(False)
        try:
            xx = x.detach().requires_grad_(True)
            score = model(xx).gather(1, t.view(-1, 1)).sum()
            return torch.autograd.grad(score, xx)[0]
        finally:
            for p in params:
                p.requires_grad_(True)

    return {"floor fwd": fwd, "floor fwd+bwd": fwd_bwd}


def salmap_fn(name: str, model: nn.Module, layer: str, x, t, args, **extra) -> Callable[[], object]:
    from salmap.workers.methods import build

    params: dict = {"inner_batch_size": args.inner_batch, **extra}
    if name in (*CAM, "scorecam"):
        params["target_layer"] = layer
    if name == "integrated_gradients":
        params["steps"] = args.steps
    if name == "smoothgrad":
        params.update(nsamples=args.samples, magnitude=False, stdev=args.sigma)
    if name == "scorecam":
        params["variant"] = "jacobgil"
    method = build(name, model, **params)
    return lambda: method(x, t)


def peer_fn(name: str, model: nn.Module, layer: str, x, t, args) -> Callable[[], object]:
    """pytorch-grad-cam (CAM family) or Captum (gradient family), as their docs show them.

    The CAM objects are built inside the call and released after it: their hooks stay on the
    model while the object lives and would otherwise slow down every other measurement."""
    if name in (*CAM, "scorecam"):
        from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
        from salmap.workers.methods.layers import resolve_layer

        cls = {"gradcam": GradCAM, "gradcam_pp": GradCAMPlusPlus, "layercam": LayerCAM,
               "scorecam": ScoreCAM}[name]
        _, module = resolve_layer(model, layer)
        targets = [ClassifierOutputTarget(int(c)) for c in t.tolist()]

        def cam() -> object:
            with cls(model=model, target_layers=[module]) as obj:
                if name == "scorecam":
                    obj.batch_size = args.inner_batch
                return obj(input_tensor=x, targets=targets)

        return cam
    from captum.attr import GuidedBackprop, IntegratedGradients, NoiseTunnel, Saliency

    if name == "gradient":
        sal = Saliency(model)
        return lambda: sal.attribute(x, target=t, abs=False)
    if name == "guided_backprop":
        gbp = GuidedBackprop(model)
        return lambda: gbp.attribute(x, target=t)
    if name == "integrated_gradients":
        ig = IntegratedGradients(model)
        return lambda: ig.attribute(x, target=t, n_steps=args.steps, method="gausslegendre",
                                    internal_batch_size=args.inner_batch)
    if name == "smoothgrad":
        nt = NoiseTunnel(Saliency(model))
        return lambda: nt.attribute(x, nt_type="smoothgrad", nt_samples=args.samples,
                                    nt_samples_batch_size=args.inner_batch, stdevs=args.sigma,
                                    target=t, abs=False)
    raise ValueError(name)


def peer_label(name: str) -> str:
    return {"gradcam": "pytorch-grad-cam GradCAM", "gradcam_pp": "pytorch-grad-cam GradCAMPlusPlus",
            "layercam": "pytorch-grad-cam LayerCAM", "scorecam": "pytorch-grad-cam ScoreCAM",
            "gradient": "Captum Saliency(abs=False)", "guided_backprop": "Captum GuidedBackprop",
            "integrated_gradients": "Captum IntegratedGradients",
            "smoothgrad": "Captum NoiseTunnel(smoothgrad)"}[name]


def row(model_name: str, name: str, batch: int, times: dict[str, float], floor_key: str,
        passes: float, note: str) -> dict[str, object]:
    ours = batch / times[f"salmap {name}"]
    peer = batch / times[f"peer {name}"]
    floor = batch / times[floor_key]
    return {
        "model": model_name, "method": name, "batch": batch, "peer": peer_label(name),
        "salmap img/s": ours, "peer img/s": peer, "salmap/peer": ours / peer,
        "floor": floor_key.replace("floor ", ""), "floor img/s": floor,
        "salmap x passes / floor": ours * passes / floor, "passes/img": note,
    }


def bench_model(model_name: str, args, device: torch.device) -> list[dict[str, object]]:
    model, layer = prepare_model(model_name, device)
    x, t = inputs(args.batch, args.size, device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    methods = [m for m in args.methods.split(",") if m]
    rows: list[dict[str, object]] = []

    # 1) single-pass methods, interleaved with both floors
    single = [m for m in methods if m in (*CAM, *GRADIENT)]
    if single:
        fns = dict(floors(model, x, t))
        for m in single:
            fns[f"salmap {m}"] = salmap_fn(m, model, layer, x, t, args)
            fns[f"peer {m}"] = peer_fn(m, model, layer, x, t, args)
        times = measure(fns, device, args.timer, repeats=args.repeats, warmup=1)
        for m in single:
            cam = m in CAM
            rows.append(row(model_name, m, args.batch, times, "floor fwd" if cam else "floor fwd+bwd",
                            1, "1 fwd + bwd to layer" if cam else "1 fwd + 1 bwd"))

    # 2) iterative methods: steps / samples passes per image, interleaved with fwd+bwd floor
    iterative = [m for m in methods if m in ITERATIVE]
    if iterative:
        fns = {"floor fwd+bwd": floors(model, x, t)["floor fwd+bwd"]}
        warm = {}
        for m in iterative:
            fns[f"salmap {m}"] = salmap_fn(m, model, layer, x, t, args)
            fns[f"peer {m}"] = peer_fn(m, model, layer, x, t, args)
            # warm up on 2 images only (same chunk shapes, a fraction of the cost)
            warm[f"salmap {m}"] = salmap_fn(m, model, layer, x[:2], t[:2], args)
            warm[f"peer {m}"] = peer_fn(m, model, layer, x[:2], t[:2], args)
        for fn in warm.values():
            fn()
        times = measure(fns, device, args.timer, repeats=args.iter_repeats, warmup=0)
        for m in iterative:
            n = args.steps if m == "integrated_gradients" else args.samples
            rows.append(row(model_name, m, args.batch, times, "floor fwd+bwd", n,
                            f"{n} x (fwd + bwd)"))

    # 3) Score-CAM: 1 + K forwards per image for both libraries
    if "scorecam" in methods:
        sc_layer = layer if args.scorecam_layer == "default" else (
            args.scorecam_layer or SCORECAM_LAYER.get(model_name, layer))
        xs, ts = x[: args.scorecam_batch], t[: args.scorecam_batch]
        from salmap.workers.methods.layers import capture_output, resolve_layer

        _, module = resolve_layer(model, sc_layer)
        with torch.no_grad(), capture_output(module) as cap:
            model(xs[:1])
        k = int(cap.activation.shape[1])
        fns = {
            "floor fwd": floors(model, x, t)["floor fwd"],
            "salmap scorecam": salmap_fn("scorecam", model, sc_layer, xs, ts, args),
            "peer scorecam": peer_fn("scorecam", model, sc_layer, xs, ts, args),
        }
        times = measure(fns, device, args.timer, repeats=args.scorecam_repeats, warmup=0)
        r = row(model_name, "scorecam", args.scorecam_batch, times, "floor fwd", 1 + k,
                f"1 + {k} fwd ({sc_layer})")
        r["floor img/s"] = args.batch / times["floor fwd"]
        r["salmap x passes / floor"] = r["salmap img/s"] * (1 + k) / r["floor img/s"]
        rows.append(r)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.set_defaults(repeats=2)
    parser.add_argument("--models", default="resnet50,lite0")
    parser.add_argument("--methods", default=",".join(ALL))
    parser.add_argument("--steps", type=int, default=4, help="IG n_steps (Captum default: 50)")
    parser.add_argument("--samples", type=int, default=4, help="SmoothGrad samples (PAIR: 25)")
    parser.add_argument("--sigma", type=float, default=0.5, help="SmoothGrad absolute stdev")
    parser.add_argument("--inner-batch", type=int, default=16,
                        help="images per forward for IG / SmoothGrad / Score-CAM (both libraries)")
    parser.add_argument("--iter-repeats", type=int, default=1)
    parser.add_argument("--scorecam-batch", type=int, default=1)
    parser.add_argument("--scorecam-layer", default=None,
                        help="'default' = the CAM layer; unset = a layer with fewer channels")
    parser.add_argument("--scorecam-repeats", type=int, default=1)
    parser.add_argument("--channels-last", action="store_true")
    args, device, timer_line = parse_timed_args(
        parser, argv, "Methods vs peers (pytorch-grad-cam, Captum) and vs the bare model")
    from importlib.metadata import version

    print(f"captum {version('captum')}, grad-cam {version('grad-cam')}; "
          f"batch {args.batch}, {args.size} px, IG steps {args.steps}, SmoothGrad samples "
          f"{args.samples}, inner batch {args.inner_batch}, repeats {args.repeats} "
          f"(iterative {args.iter_repeats}, Score-CAM {args.scorecam_repeats}), "
          f"channels_last {args.channels_last}; {timer_line}; {load_avg()}\n")
    rows: list[dict[str, object]] = []
    for name in args.models.split(","):
        model_rows = bench_model(name, args, device)
        table(model_rows)  # one table per model, printed as soon as it is measured
        sys.stdout.flush()
        rows.extend(model_rows)
    print(f"after: {load_avg()}\n")
    return rows


if __name__ == "__main__":
    main()
