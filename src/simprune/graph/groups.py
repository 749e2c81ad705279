"""Coupled channel groups, from Torch-Pruning's DependencyGraph.

A group is every (layer, dimension) whose channel index is tied together: a conv's
output, its BN, the next layers' inputs, depthwise convs, residual sums, concat
slices. Removing channel k of a group removes it from all members at once.

Model families declare the custom Torch-Pruning pruners of their parameter-free channel maps
(``simprune.models.CUSTOM_PRUNERS``), e.g. the CIFAR option-A shortcut (subsample + zero-pad), whose
input and output channels are different index spaces.
"""
from __future__ import annotations

import bisect
import fnmatch
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from simprune.errors import SimpruneError
from simprune.graph.detached import input_producers, untraced_readers
from simprune.models import CUSTOM_PRUNERS
from simprune.models.adapters import BARRIERS, adapt_for_pruning

PARAM_LAYERS = (nn.Conv2d, nn.Conv1d, nn.Linear)
KEPT_WIDTH_ATTR = "simprune_kept_width"  # on the model: layer -> why the graph keeps its output channels


@dataclass
class Member:
    """One (layer, dimension) of a group. ``dim`` is "out" or "in"; depthwise convs appear as "out"."""

    name: str
    module: nn.Module
    dim: str
    idxs: list[int]


@dataclass
class ChannelGroup:
    """Channels sharing one index across coupled layers; ``root`` names the producing layer."""

    root: str
    size: int
    members: list[Member] = field(default_factory=list)
    channel_groups: int = 1  # channels per tied class (G of a grouped conv; 2 where a channel is fed back, GhostNet)
    tied: list[list[int]] | None = None  # classes of channels that only go together (None: each alone)

    @property
    def classes(self) -> list[list[int]]:
        """Removal classes: channel indices that go together, all of ``channel_groups`` channels."""
        return self.tied if self.tied is not None else [[i] for i in range(self.size)]


    @property
    def producers(self) -> list[Member]:
        return [m for m in self.members if m.dim == "out" and isinstance(m.module, PARAM_LAYERS)]

    @property
    def consumers(self) -> list[Member]:
        return [m for m in self.members if m.dim == "in" and isinstance(m.module, PARAM_LAYERS)]

    @property
    def compensable(self) -> bool:
        """True when every reader of these channels is a conv/linear, so a removed channel can be folded
        into the kept ones; a parameter-free reader (the option-A zero-pad shortcut) passes it on unfixed."""
        readers = [m for m in self.members if m.dim == "in" and not isinstance(m.module, nn.BatchNorm2d)]
        return self.channel_groups == 1 and all(isinstance(m.module, PARAM_LAYERS) and not is_grouped(m.module)
                                                for m in readers)



def peak_memory_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux/macOS; 0 where unknown)."""
    try:
        import resource  # noqa: PLC0415 - not on Windows
    except ImportError:
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def is_grouped(module: nn.Module) -> bool:
    """A grouped conv that is not depthwise (ResNeXt, RegNet): each of its groups must keep as many channels."""
    return isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups > 1 and not is_depthwise(module)


def unsupported_layer(model: nn.Module, ignored: set[nn.Module] = frozenset()) -> tuple[str, nn.Module] | None:
    """The first layer simprune cannot prune around: attention blocks, of linear layers (transformers) or of
    convolutions (ultralytics' C2PSA/PSA ``Attention``), unless every layer in them is ignored."""
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention) or "Attention" in type(m).__name__ or type(m).__name__ == "AAttn":
            layers = [c for c in m.modules() if isinstance(c, PARAM_LAYERS)]
            if (layers or isinstance(m, nn.MultiheadAttention)) and not (layers and all(c in ignored for c in layers)):
                return name, m
    return None


@contextmanager
def _module_stack(stack: list[nn.Module]):
    """Keep ``stack`` = the modules whose forward is running (to name the layer a trace fails in)."""
    def enter(module, args) -> None:
        stack.append(module)

    def leave(module, args, output) -> None:  # must return None: a value would replace the output
        if stack:
            stack.pop()

    pre = nn.modules.module.register_module_forward_pre_hook(enter)
    post = nn.modules.module.register_module_forward_hook(leave)
    try:
        yield
    finally:
        pre.remove()
        post.remove()


def _failing_layer(exc: BaseException, stack: list[nn.Module], names: dict) -> str:
    """'layer NAME (Type)' where tracing failed: the module running, else the graph node being mapped."""
    if stack:
        m = stack[-1]
        return f"layer {names.get(m, '?')!r} ({type(m).__name__})"
    tb, node = exc.__traceback__, None
    while tb is not None:
        node = tb.tb_frame.f_locals.get("node", node)
        tb = tb.tb_next
    seen = set()
    while node is not None and id(node) not in seen:  # walk back from a functional op to the layer feeding it
        seen.add(id(node))
        if node.module in names:
            return f"layer {names[node.module]!r} ({type(node.module).__name__}), at a {type(node.module).__name__}"
        node = node.inputs[0] if node.inputs else None
    return "an operation between layers"


def find_classifier(model: nn.Module) -> nn.Module | None:
    """The last Linear (or last conv when there is no Linear): its outputs are the classes, never pruned."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                last = m
    return last


def _channels(dg: tp.DependencyGraph, member: Member) -> int | None:
    """How many channels ``member``'s layer has along its pruned dimension (None: not a channel count)."""
    pruner = dg.get_pruner_of_module(member.module)
    if pruner is None:
        return None
    get = pruner.get_out_channels if member.dim == "out" else pruner.get_in_channels
    try:
        return get(member.module)
    except Exception:  # noqa: BLE001 - a parameter-free op without a channel count
        return None


def validate_group(group: ChannelGroup, dg: tp.DependencyGraph) -> None:
    """Refuse a Torch-Pruning group that would cut the wrong channels: every index within its layer's channels,
    the root holding exactly the group's channels, a member holding more a whole number of copies of them
    (concat of the same channels, SPPF; a conv flattened into a Linear)."""
    for m in group.members:
        n = _channels(dg, m)
        if n is None or not m.idxs:
            continue
        size_wrong = len(m.idxs) != group.size if m is group.members[0] else (
            len(m.idxs) > group.size and len(m.idxs) % group.size)  # fewer: a part of tied channels (GhostNet)
        wrong = max(m.idxs) >= n or min(m.idxs) < 0 or size_wrong
        if wrong:
            raise SimpruneError(f"cannot follow the channels of layer {group.root!r}: Torch-Pruning couples "
                                f"{len(m.idxs)} indices up to {max(m.idxs)} of {m.name!r} ({type(m.module).__name__}, "
                                f"{n} {'outputs' if m.dim == 'out' else 'inputs'}) to its {group.size} channels; "
                                f"leave it whole with ignore={group.root}")


class PruningGraph:
    """The model's dependency graph and its prunable channel groups.

    Groups that end in the model's outputs, or pass a :data:`BARRIERS` layer, keep all channels;
    a group read or written by a grouped conv records its channel groups (``channel_groups``).
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor, ignore: list[str] | tuple = ()):
        self.model = adapt_for_pruning(model)
        names = {m: n for n, m in model.named_modules()}
        self.ignore_patterns = [str(p) for p in ignore]
        ignored_layers = self._ignored_layers(model, ignore)
        classifier = find_classifier(model)
        bad = unsupported_layer(model, {m for m in ignored_layers if m is not classifier})
        if bad is not None:
            raise SimpruneError(f"layer {bad[0]!r} ({type(bad[1]).__name__}) is attention, which simprune cannot "
                                "prune (it prunes convolutional networks); leave it whole with "
                                f"ignore={bad[0]}.*")
        producers = input_producers(model, example_input)
        self._outputs: set = set()  # grad_fns of the model's output tensors, recorded while tracing
        self.dg = self._trace(model, example_input, names, self._record_outputs)
        untraced = untraced_readers(self.dg, model, producers)  # their producers are kept whole
        modules = dict(model.named_modules())
        ignored_layers += [modules[p] for ps in untraced.values() for p in ps if modules[p] not in ignored_layers]
        self._to_output = self._layers_reaching_output()
        self.kept_width: dict[str, str] = {  # layer -> why its output channels stay whole (found from the graph)
            p: f"read by {reader}, which Torch-Pruning's trace does not connect to it"
            for reader, ps in untraced.items() for p in ps}
        self.groups: list[ChannelGroup] = []
        for g in self.dg.get_all_groups(ignored_layers=ignored_layers, root_module_types=(nn.Conv2d, nn.Linear)):
            group = self._channel_group(g, names)
            if group is not None:
                validate_group(group, self.dg)
                self.groups.append(group)
        self.ignored = {names[m] for m in ignored_layers}
        self._name_the_rest(names, ignored_layers)
        setattr(model, KEPT_WIDTH_ATTR, dict(self.kept_width))  # for the report
        if not self.groups:
            raise SimpruneError("the model has no prunable channel group (no conv/linear layer outside the "
                                "classifier and ignore=); nothing to prune")

    @staticmethod
    def _ignored_layers(model: nn.Module, ignore) -> list[nn.Module]:
        classifier = find_classifier(model)
        ignored_layers = [classifier] if classifier is not None else []
        for pattern in ignore:
            matched = [m for n, m in model.named_modules() if n and fnmatch.fnmatch(n, pattern)
                       and isinstance(m, PARAM_LAYERS)]
            if not matched:
                raise SimpruneError(f"ignore={pattern!r} matches no conv/linear layer; the layer names are "
                                    "model.named_modules() (`simprune info --per-layer`)")
            ignored_layers += matched
        return ignored_layers

    def _record_outputs(self, out):
        """Torch-Pruning's output_transform: remember which tensors are the model's outputs, change nothing."""
        self._outputs.update(t.grad_fn for t in tp.utils.flatten_as_list(out)
                             if isinstance(t, torch.Tensor) and t.grad_fn is not None)
        return out

    @staticmethod
    def _trace(model: nn.Module, example_input: torch.Tensor, names: dict, outputs=None) -> tp.DependencyGraph:
        was_training, stack = model.training, []
        model.eval()
        try:
            with torch.enable_grad(), _module_stack(stack):
                return tp.DependencyGraph().build_dependency(
                    model, example_inputs=example_input, customized_pruners=CUSTOM_PRUNERS, verbose=False,
                    output_transform=outputs)
        except Exception as exc:  # noqa: BLE001 - tracing failures come in many types
            where = _failing_layer(exc, stack, names)
            first = str(exc).splitlines()[0][:120] if str(exc) else ""
            raise SimpruneError(f"cannot trace the model for pruning at {where}: {type(exc).__name__}: {first}; "
                                "check example_input=, or ignore= that layer") from exc
        finally:
            model.train(was_training)

    def _layers_reaching_output(self) -> set[nn.Module]:
        """Conv/linear layers whose output reaches the model's output through parameter-free operations only
        (concat, reshape, activations, BatchNorm): their channels are the output's, so their width is fixed."""
        found = set()
        for module, node in self.dg.module2node.items():
            if not isinstance(module, PARAM_LAYERS):
                continue
            if node.grad_fn in self._outputs:
                found.add(module)
                continue
            todo, seen = list(node.outputs), set()
            while todo:
                n = todo.pop()
                if id(n) in seen or isinstance(n.module, PARAM_LAYERS):
                    continue
                seen.add(id(n))
                if not n.outputs or n.grad_fn in self._outputs:
                    found.add(module)
                    break
                todo.extend(n.outputs)
        return found

    def _name_the_rest(self, names: dict, ignored_layers: list[nn.Module]) -> None:
        """Add to ``kept_width`` every other conv/linear layer whose outputs no group prunes, and why."""
        pruned = {m.module for g in self.groups for m in g.members if m.dim == "out"}
        classifier = ignored_layers[0] if ignored_layers else None
        for module, name in names.items():
            if not isinstance(module, PARAM_LAYERS) or module in pruned or name in self.kept_width:
                continue
            if module in self._to_output:
                why = "reaches the model's output"
            elif module is classifier:
                why = "the classifier (its outputs are the classes)"
            elif module in ignored_layers:
                why = "ignore="
            else:
                why = "coupled to channels kept whole"
            self.kept_width[name] = why

    def _fixed_width(self, members: list[Member]) -> str | None:
        """Why a group's channels must stay whole: a producer feeds the model's output directly, or a member is
        frozen (``requires_grad=False``, e.g. YOLO's DFL integral conv: a fixed-size head). None: prunable."""
        for m in members:
            if m.dim == "out" and m.module in self._to_output:
                return "reaches the model's output"
            params = list(m.module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                return f"feeds the frozen layer {m.name} ({type(m.module).__name__})"
        return None

    def _channel_group(self, g, names: dict) -> ChannelGroup | None:
        """One of Torch-Pruning's groups as a ChannelGroup, or None when it must stay whole."""
        members, channel_groups = [], 1
        for dep, idxs in g:
            mod = dep.target.module
            if isinstance(mod, BARRIERS):
                return None
            if not isinstance(mod, nn.Module):
                continue
            dim = "out" if self.dg.is_out_channel_pruning_fn(dep.handler) else "in"
            members.append(Member(names.get(mod, "?"), mod, dim, list(idxs)))
            if is_grouped(mod) or isinstance(mod, nn.GroupNorm):
                channel_groups = max(channel_groups, mod.groups if is_grouped(mod) else mod.num_groups)
        why = self._fixed_width(members)
        if why is not None:
            for m in members:
                if m.dim == "out" and isinstance(m.module, PARAM_LAYERS):
                    self.kept_width.setdefault(m.name, why)
            return None
        root = members[0]
        if len(root.idxs) <= 1 or not any(m.dim == "in" and isinstance(m.module, PARAM_LAYERS) for m in members):
            return None  # a single channel, or channels nothing reads but the model's output
        size = len(root.idxs)
        if size % channel_groups:
            layer = next(m for m in members if is_grouped(m.module) or isinstance(m.module, nn.GroupNorm))
            raise SimpruneError(f"layer {layer.name!r} ({type(layer.module).__name__}) splits {size} "
                                f"channels into {channel_groups} groups unevenly; leave it whole with ignore={root.name}")
        tied = self._tied_classes(root, size, channel_groups)
        if tied is None:
            return ChannelGroup(root.name, size, members, channel_groups)
        class_size = len(tied[0])
        if any(len(c) != class_size for c in tied) or len(tied) < 2:
            return None  # channels tied unevenly (or all together): kept whole
        return ChannelGroup(root.name, size, members, class_size, tied)

    def _removed_with(self, root: Member, idx: int) -> set[int]:
        """The root layer's channels Torch-Pruning removes along with channel ``idx`` (itself, unless the
        group feeds back into its own root, as a GhostNet module's concat of x and dwconv(x) does)."""
        handler = self.dg.get_pruner_of_module(root.module).prune_out_channels
        out = set()
        for item in self.dg.get_pruning_group(root.module, handler, [idx]):
            if item.dep.target.module is root.module and self.dg.is_out_channel_pruning_fn(item.dep.handler):
                out.update(int(i) for i in item.idxs)
        return out

    def _tied_classes(self, root: Member, size: int, channel_groups: int) -> list[list[int]] | None:
        """Classes of root channels that can only go together: a grouped conv's G groups lose the same
        positions, and channels coupled back to their own root are removed together. None: each alone."""
        parent = list(range(size))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        per = size // channel_groups
        for p in range(per):
            for k in range(1, channel_groups):
                parent[find(p + k * per)] = find(p)
        coupled = any(self._removed_with(root, i) != {i} for i in {0, size - 1})
        if coupled:  # ask for every channel (only for the few groups that feed back into themselves)
            for i in range(size):
                for j in self._removed_with(root, i):
                    if j < size:
                        parent[find(j)] = find(i)
        if channel_groups == 1 and not coupled:
            return None
        classes: dict[int, list[int]] = {}
        for i in range(size):
            classes.setdefault(find(i), []).append(i)
        return sorted(classes.values())

    def group(self, layer: str) -> ChannelGroup:
        """The group rooted at ``layer``, else the group whose outputs ``layer`` produces."""
        for g in self.groups:
            if g.root == layer:
                return g
        for g in self.groups:
            if any(m.name == layer and m.dim == "out" for m in g.members):
                return g
        raise SimpruneError(f"no channel group produced by layer {layer!r}")

    def prune_group(self, group: ChannelGroup, remove: list[int]) -> None:
        """Physically remove channels ``remove`` (indices into the group's current numbering)."""
        if not remove:
            return
        root = group.members[0]
        handler = self.dg.get_pruner_of_module(root.module).prune_out_channels
        pg = self.dg.get_pruning_group(root.module, handler, sorted(int(i) for i in remove))
        pg.prune(record_history=False)
        self._renumber(group, sorted(int(i) for i in remove))
        group.size -= len(remove)

    def _renumber(self, group: ChannelGroup, remove: list[int]) -> None:
        """Keep ``Member.idxs`` true after a removal: the group's members drop the removed channels' indices,
        and every member of a touched (module, dim), in any group, is renumbered past them. Members that map
        only part of a tied (fed-back) group keep their traced indices."""
        gone: dict[tuple[int, str], set[int]] = {}
        for m in group.members:
            if not m.idxs or len(m.idxs) % group.size:  # a member covering part of a tied group: left as traced
                continue
            per = len(m.idxs) // group.size
            gone.setdefault((id(m.module), m.dim), set()).update(m.idxs[c * per + j] for c in remove for j in range(per))
        for g in [group, *(g for g in self.groups if g is not group)]:
            for m in g.members:
                cut = gone.get((id(m.module), m.dim))
                if cut:
                    order = sorted(cut)
                    m.idxs = [i - bisect.bisect_left(order, i) for i in m.idxs if i not in cut]
