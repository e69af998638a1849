"""Convert the paper authors' released EDM snapshots into this project's network (UC-LoRA).

    python -m tools.drivers.authors_checkpoint cifar10-uncond.pkl --dataset=cifar10-uncond   # converted and scored
    python -m tools.drivers.authors_checkpoint cifar10-uncond.pkl --out=converted.pkl         # converted only

--dataset files the converted snapshot as the pretrained row's run of the authors' checkpoint
(tools.paper.rows.run_folder(authors=True)), at 100,000 kimg (their README trains from EDM's
published network for 100 Mimg), and scores it as `make score` would.

The authors trained their CIFAR-10 and FFHQ 64x64 networks with their fork of EDM
(github.com/lthilnklover/diffusion_lora; its README links the snapshots). Those pickles do not load
beside this project's EDM tree: EDM's persistence re-runs the pickled source of their networks.py,
which imports `training.nn` (absent here) and `training.lora` (here the name of this project's LoRA
core), and their LoRA class `training.lora.LoraInjectedConv` is not persistent, so its code is not in
the pickle at all.

Reading, and why this way: a restricted unpickler (AuthorsUnpickler) turns the file into data and
runs none of its code. A persistent object becomes a record of its class name and state (its embedded
source is dropped unread), LoraInjectedConv a stand-in that holds its tensors, tensor storages load
with torch.load(weights_only=True), and every other global but torch's tensors and layers, numpy
scalars and OrderedDict is refused. Stub modules for `training.nn` and `training.lora` would instead
run the authors' source from a downloaded file, and would have to stand in for this project's own
`training` package, which builds the converted network in the same process.

Their layer computes conv(x) + scale * (up(w * down(x)) + w @ bias), w the composition MLP's output on
the block's embedding emb, each basis' weight repeated over its r rows: what UCLoRAConv computes.
Theirs -> ours, for each adapted layer X (qkv, proj of every attention block), m bases of rank r:
    X.conv.weight [C_out, C_in, 1, 1]        -> X.weight           the base convolution, same layout
    X.conv.bias [C_out]                      -> X.bias
    X.lora_down.weight [m*r, C_in, 1, 1]     -> X.lora_A           same layout
    X.lora_up.weight [C_out, m*r, 1, 1]      -> X.lora_B [C_out, m*r]
    X.bias [m*r, C_out]                      -> X.lora_bias        same layout
    X.scale: the float 1 (their release)     -> --lora-scale=fixed (no tensor)
             a Parameter [1] (their commented-out trainable scale, used as is) -> X.lora_scale []
    X.comp_weights.<i>.0, .<i>.1 (Linear, GroupNorm of hidden layer i) -> X.lora_mlp.layers.<3i>, .<3i+1>
    X.comp_weights.<last> (Linear to m)      -> X.lora_mlp.layers.<3 last>
Every other tensor keeps its name. Bases, rank, MLP widths, bias term and scale are read from the
shapes, the network's arguments from the preconditioner's recorded init_kwargs. Every source tensor
must find its place and every tensor of the new network must be filled, or nothing is written. The
snapshot has EDM's format (ema, loss_fn, augment_pipe, dataset_kwargs), so generate.py loads it.
"""

import argparse
import collections
import io
import os
import pickle
import sys

import torch

from tools import ROOT
from tools.paper.rows import find, run_folder
from tools.scoring.score import score_folder
from tools.scoring.upstreams import EDM
from tools.vendoring.run import interruptible
from tools.vendoring.upstream import import_vendor_tree

TOOL = 'authors_checkpoint'
RELEASED = ['cifar10-uncond', 'ffhq64'] # the datasets of the authors' released snapshots
PRECONDS = ['VPPrecond', 'VEPrecond', 'iDDPMPrecond', 'EDMPrecond'] # EDM's preconditioners, which hold the U-Net as .model
OUR_LORA_CLASSES = ['UCLoRAConv', 'ClassLoRAConv', 'TimeClassLoRAConv']
NUMPY_MODULES = ['numpy', 'numpy.core.multiarray', 'numpy._core.multiarray'] # numpy 1 and 2 spell the module differently
NUMPY_NAMES = ['scalar', 'dtype', 'ndarray', '_reconstruct'] # EDM keeps numpy floats (skip_scale) in module state


class ConversionError(Exception):
    """A file this tool cannot convert, in one line."""

#----------------------------------------------------------------------------
# Reading an authors' pickle as data.

class RecordedModule(torch.nn.Module):
    """A persistent EDM module of the pickle: `recorded_class` and its state (parameters, buffers,
    submodules, init_args, init_kwargs). It has no forward: its code is not run."""


class RecordedObject:
    """A persistent EDM object that is not a module (a loss, AugmentPipe): `recorded_class` and its state."""


class AuthorsLoRAConv(torch.nn.Module):
    """Stand-in for the authors' training.lora.LoraInjectedConv: holds what the pickle stores
    (conv, lora_down, lora_up, bias, scale, comp_weights, bypass)."""


def record_persistent(meta):
    """Takes the place of torch_utils.persistence._reconstruct_persistent_obj: the object as a record."""
    if meta.get('type') != 'class':
        raise pickle.UnpicklingError(f'a persistent object of type {meta.get("type")!r}, not a class')
    state = dict(meta['state'])
    if '_modules' in state:
        obj = RecordedModule.__new__(RecordedModule)
        torch.nn.Module.__setstate__(obj, state) # also fills what newer torch versions add to a module
    else:
        obj = RecordedObject()
        obj.__dict__.update(state)
    obj.__dict__['recorded_class'] = meta['class_name']
    return obj


def load_storage(data):
    """Takes the place of torch.storage._load_from_bytes, which unpickles without restriction."""
    return torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)


class AuthorsUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        replaced = {
            ('torch_utils.persistence', '_reconstruct_persistent_obj'): record_persistent,
            ('training.lora', 'LoraInjectedConv'): AuthorsLoRAConv,
            ('torch.storage', '_load_from_bytes'): load_storage,
            ('collections', 'OrderedDict'): collections.OrderedDict,
            ('dnnlib.util', 'EasyDict'): dict,
        }
        if (module, name) in replaced:
            return replaced[module, name]
        if module in NUMPY_MODULES and name in NUMPY_NAMES:
            return super().find_class(module, name)
        if module.split('.')[0] == 'torch':
            obj = super().find_class(module, name)
            if isinstance(obj, torch.dtype) or obj in [torch.device, torch.Size, torch.Tensor, torch.nn.Parameter] or \
                    (isinstance(obj, type) and issubclass(obj, torch.nn.Module)) or \
                    (module in ['torch._utils', 'torch._tensor'] and name.startswith('_rebuild_')):
                return obj
        raise pickle.UnpicklingError(f'refused global {module}.{name} (this tool reads tensors, torch layers and EDM\'s persistent objects only)')


def read_pickle(path):
    try:
        with open(path, 'rb') as f:
            return AuthorsUnpickler(f).load()
    except Exception as err: # unpickling fails in many ways, each with its own exception
        message = str(err).strip().splitlines()[0] if str(err).strip() else 'no message'
        raise ConversionError(f'not an EDM snapshot pickle ({type(err).__name__}: {message})')

#----------------------------------------------------------------------------
# The authors' network: its preconditioner record and LoRA layers.

def authors_network(contents):
    """(preconditioner record, {name: AuthorsLoRAConv}) of an authors' snapshot."""
    if not (isinstance(contents, dict) and 'ema' in contents):
        raise ConversionError('a pickle without the key "ema": not an EDM network snapshot')
    net = contents['ema']
    if not (isinstance(net, RecordedModule) and net.recorded_class in PRECONDS and isinstance(net._modules.get('model'), RecordedModule)):
        kind = getattr(net, 'recorded_class', type(net).__name__)
        raise ConversionError(f'its "ema" is a {kind}, not an EDM preconditioner ({", ".join(PRECONDS)})')
    lora_layers = {name: module for name, module in net.named_modules() if isinstance(module, AuthorsLoRAConv)}
    if not lora_layers:
        ours = sorted({getattr(module, 'recorded_class', None) for module in net.modules()} & set(OUR_LORA_CLASSES))
        if ours:
            raise ConversionError(f'already this project\'s format ({", ".join(ours)} layers): nothing to convert')
        raise ConversionError('not the authors\' layout: no LoRA layers of theirs (training.lora.LoraInjectedConv); a plain EDM network?')
    return net, lora_layers


def lora_settings(name, layer):
    """This project's LoRA options for one authors' layer, read from its shapes (see the module docstring)."""
    def refuse(why):
        raise ConversionError(f'not the authors\' layout: LoRA layer {name} {why}')
    if sorted(layer._modules) != ['comp_weights', 'conv', 'lora_down', 'lora_up']:
        refuse(f'has submodules {", ".join(layer._modules)}, not conv, lora_down, lora_up, comp_weights')
    if getattr(layer, 'bypass', False):
        refuse('is bypassed (set_bypass(True)): it computes its base convolution only')
    conv, down, up = layer.conv, layer.lora_down, layer.lora_up
    kernel = conv.weight.shape[-1]
    if not all(isinstance(c, torch.nn.Conv2d) and c.stride == (1, 1) and c.dilation == (1, 1) and c.groups == 1 for c in [conv, down, up]):
        refuse('has convolutions other than 2D, stride 1, no dilation, one group')
    if conv.padding != (kernel // 2,) * 2 or down.padding != conv.padding or down.weight.shape[-2:] != conv.weight.shape[-2:]:
        refuse(f'has paddings {conv.padding}, {down.padding} with kernel {kernel} (this project pads kernel // 2)')
    if up.weight.shape[-2:] != (1, 1):
        refuse(f'has a {up.weight.shape[-2]}x{up.weight.shape[-1]} up-projection; this project\'s lora_B is 1x1')

    mlp = list(layer.comp_weights)
    hidden, last = mlp[:-1], mlp[-1]
    layer_kinds = [[getattr(module, 'recorded_class', type(module).__name__) for module in block] if isinstance(block, torch.nn.Sequential) else None for block in hidden]
    if not hidden or any(kinds != ['Linear', 'GroupNorm', 'SiLU'] for kinds in layer_kinds) or getattr(last, 'recorded_class', None) != 'Linear':
        refuse(f'has a composition MLP of {layer_kinds} then {getattr(last, "recorded_class", type(last).__name__)}, not (Linear, GroupNorm, SiLU) blocks then Linear')
    bases, rows = last.weight.shape[0], down.weight.shape[0]
    if rows % bases:
        refuse(f'has {rows} down-projection rows for {bases} bases')

    scale = getattr(layer, 'scale', 1.0)
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            refuse(f'has a scale of shape {list(scale.shape)}, not one number')
        lora_scale = 'trainable'
    elif float(scale) == 1:
        lora_scale = 'fixed'
    else:
        refuse(f'has the fixed scale {scale}; this project\'s fixed scale is 1')
    return dict(lora_bases=bases, lora_rank=rows // bases, lora_mlp=[block[0].weight.shape[0] for block in hidden],
                lora_bias=layer._parameters.get('bias') is not None, lora_scale=lora_scale)


def renames(prefix, layer):
    """{authors' tensor name: (our name, reshape?)} for the LoRA layer at `prefix` (see the module docstring)."""
    p = prefix + '.'
    names = {p + 'conv.weight': (p + 'weight', False), p + 'conv.bias': (p + 'bias', False),
             p + 'lora_down.weight': (p + 'lora_A', False), p + 'lora_up.weight': (p + 'lora_B', True),
             p + 'bias': (p + 'lora_bias', False), p + 'scale': (p + 'lora_scale', True)}
    last = len(layer.comp_weights) - 1
    for kind in ['weight', 'bias']:
        for i in range(last):
            names[f'{p}comp_weights.{i}.0.{kind}'] = (f'{p}lora_mlp.layers.{3 * i}.{kind}', False)     # Linear
            names[f'{p}comp_weights.{i}.1.{kind}'] = (f'{p}lora_mlp.layers.{3 * i + 1}.{kind}', False) # GroupNorm
        names[f'{p}comp_weights.{last}.{kind}'] = (f'{p}lora_mlp.layers.{3 * last}.{kind}', False)
    return names


def listed(names, limit=10):
    names = list(names)
    return ', '.join(names[:limit]) + (f' and {len(names) - limit} more' if len(names) > limit else '')

#----------------------------------------------------------------------------
# Building and filling this project's network.

def build_network(net, settings):
    """This project's preconditioner with the recorded arguments and the LoRA options, random until filled."""
    from training import networks
    try:
        return getattr(networks, net.recorded_class)(*net._init_args, **net._init_kwargs, lora='uc', **settings)
    except (TypeError, ValueError) as err:
        raise ConversionError(f'this project\'s {net.recorded_class} refuses the recorded arguments ({err})')


def fill(target, source_state, lora_layers):
    """Copy every tensor of source_state (the authors' network) into its place in `target`; how many."""
    wanted = target.state_dict(keep_vars=True)
    rules = {}
    for prefix, layer in lora_layers.items():
        rules.update(renames(prefix, layer))
    pairs, unmapped, misshapen = {}, [], []
    for name, value in source_state.items():
        in_lora = any(name.startswith(prefix + '.') for prefix in lora_layers)
        target_name, reshape = rules.get(name, (None, False) if in_lora else (name, False))
        if target_name not in wanted:
            unmapped.append(name)
        elif value.shape != wanted[target_name].shape and not (reshape and value.numel() == wanted[target_name].numel()):
            misshapen.append(f'{name} {list(value.shape)} -> {target_name} {list(wanted[target_name].shape)}')
        else:
            pairs[name] = target_name
    unfilled = [name for name in wanted if name not in set(pairs.values())]
    if unmapped:
        raise ConversionError(f'{len(unmapped)} tensors have no place in this project\'s network: {listed(unmapped)}')
    if misshapen:
        raise ConversionError(f'{len(misshapen)} tensors differ in shape: {listed(misshapen)}')
    if unfilled:
        raise ConversionError(f'{len(unfilled)} tensors of this project\'s network have no source: {listed(unfilled)}')
    with torch.no_grad():
        for name, target_name in pairs.items():
            wanted[target_name].copy_(source_state[name].reshape(wanted[target_name].shape))
    return len(pairs)


def check_group_norms(target, lora_layers):
    """The composition MLPs' GroupNorms carry no tensor that says their groups: compare them."""
    for prefix, layer in lora_layers.items():
        for i, block in enumerate(list(layer.comp_weights)[:-1]):
            theirs, ours = block[1], target.get_submodule(f'{prefix}.lora_mlp.layers.{3 * i + 1}')
            if (theirs.num_groups, theirs.eps) != (ours.num_groups, ours.eps):
                raise ConversionError(f'{prefix}.comp_weights.{i}.1 has {theirs.num_groups} groups, eps {theirs.eps}; '
                                      f'this project\'s has {ours.num_groups} groups, eps {ours.eps}')


def rebuild(key, value):
    """A snapshot entry other than the network: EDM's loss or AugmentPipe rebuilt from its recorded
    arguments by this project's tree, plain data as it is."""
    from training import augment, loss
    if isinstance(value, RecordedObject):
        cls = getattr(loss, value.recorded_class, None) or getattr(augment, value.recorded_class, None)
        if cls is None:
            raise ConversionError(f'its "{key}" is a {value.recorded_class}, which this project\'s EDM tree does not have')
        obj = cls(*value._init_args, **value._init_kwargs)
        public = lambda o: {k: v for k, v in vars(o).items() if not k.startswith('_') and k != 'recorded_class'}
        if public(obj) != public(value):
            raise ConversionError(f'its "{key}" ({value.recorded_class}) holds a state its recorded arguments do not rebuild')
        return obj
    if is_plain(value):
        return value
    raise ConversionError(f'its "{key}" is a {getattr(value, "recorded_class", type(value).__name__)}: '
                          'not one of the entries EDM writes (ema, loss_fn, augment_pipe, dataset_kwargs)')


def is_plain(value):
    if isinstance(value, dict):
        return all(is_plain(k) and is_plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))

#----------------------------------------------------------------------------

def convert(src_path, dst_path):
    """Convert the authors' snapshot src_path into this project's format at dst_path (written
    atomically). Returns a summary: the network, the LoRA options and train.py flags of the same
    network, and the number of tensors in the source and in the written network (always equal).
    Raises ConversionError (one line) for a file it cannot convert; then nothing is written."""
    if not os.path.isfile(src_path):
        raise ConversionError('no such file')
    contents = read_pickle(src_path)
    net, lora_layers = authors_network(contents)
    settings = {name: lora_settings(name, layer) for name, layer in lora_layers.items()}
    first_name, first = next(iter(settings.items()))
    for name, options in settings.items():
        if options != first:
            raise ConversionError(f'LoRA layers {first_name} ({first}) and {name} ({options}) differ; this project gives every layer the same options')

    import_vendor_tree('edm', TOOL)
    target = build_network(net, first)
    source_state = net.state_dict(keep_vars=True)
    copied = fill(target, source_state, lora_layers)
    check_group_norms(target, lora_layers)
    snapshot = {key: target.eval().requires_grad_(False) if key == 'ema' else rebuild(key, value) for key, value in contents.items()}

    os.makedirs(os.path.dirname(os.path.abspath(dst_path)), exist_ok=True)
    with open(dst_path + '.partial', 'wb') as f:
        pickle.dump(snapshot, f)
    os.replace(dst_path + '.partial', dst_path)

    model = net.model
    flags = ['--lora=uc', f'--lora-bases={first["lora_bases"]}', f'--lora-rank={first["lora_rank"]}',
             f'--lora-mlp={",".join(map(str, first["lora_mlp"]))}', f'--lora-bias={first["lora_bias"]}', f'--lora-scale={first["lora_scale"]}']
    return dict(network=f'{net.recorded_class} ({model.recorded_class}, {net.img_channels}x{net.img_resolution}x{net.img_resolution}, {net.label_dim} classes)',
                lora_layers=len(lora_layers), **first, flags=flags, source_tensors=len(source_state), copied_tensors=copied,
                target_tensors=len(target.state_dict()), parameters=sum(p.numel() for p in target.parameters()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('src', metavar='SRC.pkl', help='a snapshot of the authors\' EDM fork (network-snapshot-*.pkl)')
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument('--dataset', choices=RELEASED,
                       help="file it as the pretrained row's authors' run of this dataset, and score it")
    where.add_argument('--out', metavar='DST.pkl', help='where to write the converted snapshot (not scored)')
    parser.add_argument('--runs', default=os.path.join(ROOT, 'runs'), help='where run folders go (with --dataset)')
    parser.add_argument('--gpus', type=int, default=1, help='processes (GPUs) that share generation (with --dataset)')
    parser.add_argument('--fid-evaluations', type=int, help='FID evaluations (with --dataset)')
    parser.add_argument('--fid-images', type=int, help='images an evaluation (with --dataset)')
    parser.add_argument('--keep-images', action='store_true', help='keep the generated images once scored (with --dataset)')
    args = parser.parse_args(argv)
    folder = run_folder(args.runs, find('edm', args.dataset, 'pretrained'), authors=True) if args.dataset else None
    if folder:
        args.out = os.path.join(folder, EDM.snapshot_name(100000)) # their README: 100 Mimg from EDM's published network
    try:
        summary = convert(args.src, args.out)
    except ConversionError as err:
        sys.exit(f'{TOOL}: {args.src}: {err}')
    print(f'{TOOL}: {summary["network"]}, UC-LoRA on {summary["lora_layers"]} layers; {summary["copied_tensors"]} of '
          f'{summary["source_tensors"]} tensors copied, {summary["parameters"]:,} parameters')
    print(f'{TOOL}: the same network as train.py {" ".join(summary["flags"])}')
    print(f'{TOOL}: wrote {args.out}')
    if folder:
        score_folder(folder, args.gpus, 'all', args.fid_evaluations, args.fid_images, args.keep_images)


if __name__ == '__main__':
    with interruptible('make edm-authors-checkpoint'): # Ctrl-C: one line, no traceback
        main()
