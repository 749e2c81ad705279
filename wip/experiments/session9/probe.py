"""Prototype: an allocation that sees the end-to-end effect of a removal. Each group's channels are
ordered by an inner criterion; removing the first f of them (f in FRACTIONS, by masking every reader's
input, exactly a removal) is measured as the KL of the logits on the first N calibration images; each
channel's score is the marginal KL of its segment (monotone along the order), the allocator divides
by MACs per channel (cost_weight=1). Usage: python probe.py SAMPLE TARGET INNER [N] [refit|none]"""
import json
import sys
import time

import torch

import simprune
from simprune import Repair, Selection
from simprune.calibrate.batches import Calibration, run_model
from simprune.calibrate.sensitivity import gain_images, output_change, output_tensors
from simprune.criteria import get_criterion
from simprune.criteria.base import Criterion, CriterionResult
from simprune.graph.groups import PARAM_LAYERS, is_depthwise
from simprune.io.imagenet import load_pretrained
from simprune.io.images import calibration_images, manifest_dataset, torchvision_preprocess

FRACTIONS = (0.125, 0.25, 0.5, 0.75)


def mask_hook(idxs):
    index = torch.tensor(sorted(idxs), dtype=torch.long)

    def hook(_m, args):
        x = args[0].clone()
        x.index_fill_(1, index.to(x.device), 0.0)
        return (x, *args[1:])
    return hook


class Probed(Criterion):
    needs_data = True
    normalization = "none"

    def __init__(self, inner, images=64):
        self.inner, self.images, self.name = inner, images, f"probed:{inner.name}"

    def score(self, graph, calibration=None):
        t0 = time.perf_counter()
        inner = self.inner.score(graph, calibration) if self.inner.needs_data else self.inner.score(graph)
        batches = gain_images(calibration, self.images)
        model, scores, curves = graph.model, {}, {}
        with Calibration.running(model) as device:
            ref = [output_tensors(run_model(model, x.to(device))) for x in batches]
            for group in graph.groups:
                s = inner.scores.get(group.root)
                if s is None:
                    continue
                classes = group.classes
                cls = torch.stack([s[c].double().mean() for c in classes])
                order = torch.argsort(cls, stable=True).tolist()
                readers = [m for m in group.members if m.dim == "in" and isinstance(m.module, PARAM_LAYERS)
                           and not is_depthwise(m.module)]
                points, curve = [0], [0.0]
                for f in FRACTIONS:
                    n = max(1, round(f * len(classes)))
                    if n <= points[-1] or n >= len(classes):
                        continue
                    gone = [ch for c in order[:n] for ch in classes[c]]
                    handles = []
                    for m in readers:
                        per = len(m.idxs) // group.size
                        handles.append(m.module.register_forward_pre_hook(
                            mask_hook({m.idxs[c * per + j] for c in gone for j in range(per)})))
                    try:
                        ch = sum(output_change(r, output_tensors(run_model(model, x.to(device)))) * x.shape[0]
                                 for r, x in zip(ref, batches)) / sum(x.shape[0] for x in batches)
                    finally:
                        for h in handles:
                            h.remove()
                    points.append(n)
                    curve.append(max(ch, curve[-1]))
                cls_score = torch.zeros(len(classes), dtype=torch.float64)
                last = 0.0
                for (a, b), (ca, cb) in zip(zip(points, points[1:]), zip(curve, curve[1:])):
                    last = max(last, (cb - ca) / (b - a))
                    for k in order[a:b]:
                        cls_score[k] = last
                for k in order[points[-1]:]:
                    last = last * 2 + 1e-9
                    cls_score[k] = last
                # tie-break within a segment by the inner order (tiny increasing offset)
                for pos, k in enumerate(order):
                    cls_score[k] += 1e-12 * pos
                full = torch.zeros(group.size, dtype=torch.float64)
                for k, c in enumerate(classes):
                    full[c] = cls_score[k]
                scores[group.root] = full
                curves[group.root] = list(zip(points, curve))
        print(f"probe: {len(scores)} groups in {time.perf_counter() - t0:.0f} s", flush=True)
        self.curves = curves
        return CriterionResult(scores, normalization="none")


if __name__ == "__main__":
    sample, target, inner_name = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    repair = Repair.none() if len(sys.argv) > 5 and sys.argv[5] == "none" else Repair.auto()
    model = load_pretrained("mobilenet_v2", "IMAGENET1K_V1")
    pre = torchvision_preprocess("mobilenet_v2", "IMAGENET1K_V1")
    calib = calibration_images(f"{sample}/manifest.csv:calibration", pre, n_images=500)
    ev = torch.utils.data.DataLoader(manifest_dataset(f"{sample}/manifest.csv:evaluation", pre), batch_size=50)
    crit = Probed(get_criterion(inner_name), images=n)
    t0 = time.perf_counter()
    pruned, report = simprune.prune(model, torch.zeros(1, 3, 224, 224), crit, {"flops": target}, calibration=calib,
                                    selection=Selection(cost_weight=float(__import__("os").environ.get("CW", "1.0"))), repair=repair)
    sec = time.perf_counter() - t0
    pruned.eval()
    correct = tot = 0
    with torch.no_grad():
        for x, y in ev:
            correct += int((pruned(x).argmax(1) == y).sum())
            tot += len(y)
    print(json.dumps({"target": target, "inner": inner_name, "images": n, "top1": 100 * correct / tot,
                      "reduction": report["reduction"], "seconds": sec,
                      "widths": {k: v for k, v in (report.get("widths") or {}).items()} if isinstance(report.get("widths"), dict) else None}, indent=1))
    json.dump({k: v for k, v in crit.curves.items()}, open(f"/work/exp/probe_curves_{inner_name.replace(':','_')}_{target}.json", "w"))
