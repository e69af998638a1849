"""Paper Fig. 4, Fig. 7, Appendix B: how alike a snapshot's LoRA composition weights are between conditions.

    python -m tools.figures.composition_maps runs/edm-cifar10-uncond-with-lora/network-snapshot-200000.pkl
    python -m tools.figures.composition_maps runs/iddpm-cifar10-uncond-with-lora/ema_0.9999_500000.pt --out maps
    python -m tools.figures.composition_maps runs/nano-compare/uclora-seed0/checkpoint.pt --each-layer

Reads a snapshot of any upstream; the file tells its kind (--kind, if given, is checked against it):
    edm    network-snapshot-*.pkl of a UC-LoRA run: each layer's composition MLP output at noise
           levels sigma log-spaced over EDM's sampling range, recorded (forward hooks) while the
           network runs once on a zero image a level, so sigma goes through the preconditioner's
           and the U-Net's own embedding, whichever they are.
    iddpm  model*.pt / ema_*.pt of a compositional TimeLoRA run: the rows of each layer's
           composition table, one a time step (every k-th step when T is larger than --max-steps).
    nano   nano.py's checkpoint.pt of a timelora or uclora run: nano_lora's composition weights at
           every 10th step, as in the run's own omega_similarity.png.
Writes into --out (default: composition-maps-<snapshot name>, beside the snapshot): mean.png (the
mean of the layers' similarity matrices), layers.png (every adapted layer, small, in network order),
with --each-layer also layers/<layer>.png, similarity.json (the mean similarity of near and of far
conditions, per layer and for the mean) and similarity.npz (the conditions, weights and matrices).
"""

import argparse
import json
import os
import pickle
import re
import sys

import numpy as np
import torch

from tools.figures.composition import FAR, NEAR, Axis, cosine_similarity, near_and_far, save_heatmap, save_layer_grid
from tools.vendoring.run import interruptible
from tools.vendoring.upstream import import_vendor_tree

TOOL = 'composition_maps'
KINDS = ['edm', 'iddpm', 'nano']
SIGMA_MIN, SIGMA_MAX = 0.002, 80 # EDM's sampling range (generate.py's defaults)
EDM_BATCH = 16 # noise levels a forward pass: bounds the memory that a large network's activations take


class SnapshotError(Exception):
    """A snapshot this tool cannot read, in one line."""


def read_snapshot(path):
    """(kind, contents) of a snapshot file: EDM's pickle, or a torch file (IDDPM's state dict, nano.py's checkpoint)."""
    with open(path, 'rb') as f:
        torch_file = f.read(4) == b'PK\x03\x04' # torch.save writes a zip archive; EDM pickles are plain pickles
    if torch_file:
        try:
            contents = torch.load(path, map_location='cpu', weights_only=True) # tensors and plain values only: no code runs
        except Exception: # unpickling fails in many ways, each with its own exception
            raise SnapshotError('a torch file holding more than tensors and plain values (EDM\'s training-state-*.pt?); '
                                'this tool reads EDM\'s network-snapshot-*.pkl, IDDPM\'s model*.pt / ema_*.pt and nano.py\'s checkpoint.pt')
        if isinstance(contents, dict) and {'network', 'options'} <= contents.keys():
            return 'nano', contents
        if isinstance(contents, dict) and contents and all(isinstance(v, torch.Tensor) for v in contents.values()):
            return 'iddpm', contents
        raise SnapshotError('a torch file, but neither a state dict (IDDPM model*.pt, ema_*.pt) nor nano.py\'s checkpoint.pt')
    # EDM pickles carry their classes' source, which EDM's torch_utils turns back into classes.
    import_vendor_tree('edm', TOOL)
    import dnnlib
    try:
        with dnnlib.util.open_url(path) as f:
            contents = pickle.load(f)
    except Exception as err: # as above: anything may fail while unpickling
        raise SnapshotError(f'neither a torch file nor an EDM pickle ({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else "no message"})')
    if not (isinstance(contents, dict) and 'ema' in contents):
        raise SnapshotError('a pickle without the key "ema": not an EDM network snapshot')
    return 'edm', contents


# ---------------------------------------------------------------------------- EDM: UC-LoRA

def edm_composition_weights(net, sigmas, class_index=0):
    """{layer name: [S, m] composition weights at the noise levels `sigmas` [S]}, for every module with a
    composition MLP (`lora_mlp`), in network order. The network runs on zero images (one a noise level;
    the image does not reach the MLPs), with the one-hot label `class_index` when it is conditional."""
    layers = {name: module for name, module in net.named_modules() if hasattr(module, 'lora_mlp')}
    if not layers and any(hasattr(module, 'lora_A') for module in net.modules()):
        raise SnapshotError('LoRA layers without a composition MLP (ClassLoRA: its weights are the class vector itself): '
                            'no composition weights to compare between noise levels')
    if not layers:
        raise SnapshotError('no UC-LoRA layers (no module with a composition MLP): a baseline or adaLN snapshot?')
    if net.label_dim and not 0 <= class_index < net.label_dim:
        raise SnapshotError(f'--class {class_index}: the network has classes 0 to {net.label_dim - 1}')
    recorded = {name: [] for name in layers}
    hooks = [module.lora_mlp.register_forward_hook(lambda _module, _inputs, output, name=name: recorded[name].append(output.float()))
             for name, module in layers.items()]
    try:
        with torch.no_grad():
            for chunk in sigmas.split(EDM_BATCH):
                images = torch.zeros([len(chunk), net.img_channels, net.img_resolution, net.img_resolution])
                labels = torch.eye(net.label_dim)[[class_index] * len(chunk)] if net.label_dim else None
                net(images, chunk, labels)
    finally:
        for hook in hooks:
            hook.remove()
    weights = {}
    for name, outputs in recorded.items():
        w = torch.cat(outputs) if outputs else torch.zeros(0)
        if w.ndim != 2 or len(w) != len(sigmas):
            raise SnapshotError(f'{name}: its composition MLP gave {list(w.shape)} for {len(sigmas)} noise levels, not one row a level')
        weights[name.removeprefix('model.')] = w # every EDM preconditioner holds its U-Net as .model
    return weights


def edm_maps(contents, args):
    """The composition weights of an EDM snapshot's UC-LoRA layers at --sigmas noise levels (see READERS)."""
    net = contents['ema']
    if not all(hasattr(net, name) for name in ['img_channels', 'img_resolution', 'label_dim', 'model']):
        raise SnapshotError(f'its "ema" is a {type(net).__name__}, not an EDM preconditioner (EDMPrecond, VPPrecond, ...)')
    net = net.eval().cpu()
    sigmas = torch.tensor(np.geomspace(args.sigma_min, args.sigma_max, args.sigmas), dtype=torch.float32)
    label = f', class {args.class_index}' if net.label_dim else ''
    weights = edm_composition_weights(net, sigmas, args.class_index)
    print(f'{type(net).__name__} ({type(net.model).__name__}, {net.img_channels}x{net.img_resolution}x{net.img_resolution}{label}) '
          f'ran once on {args.sigmas} noise levels')
    axis = Axis(values=sigmas.double().numpy(), label=r'$\sigma$', log=True, span=np.log(args.sigma_max / args.sigma_min))
    conditions = f'{args.sigmas} noise levels sigma, log-spaced from {args.sigma_min:g} to {args.sigma_max:g}{label}'
    return weights, axis, conditions, 'noise levels'


# ---------------------------------------------------------------------------- IDDPM: TimeLoRA

def iddpm_maps(state, args):
    """The composition tables' rows of an IDDPM state dict, at most --max-steps of them (see READERS)."""
    tables = {key.removesuffix('.lora_table.weight'): value for key, value in state.items() if key.endswith('.lora_table.weight')}
    if not tables:
        if any('.lora_A' in key for key in state):
            raise SnapshotError('LoRA layers without a composition table (non-compositional TimeLoRA, or ClassLoRA only): '
                                'no composition weights to compare between time steps')
        raise SnapshotError('no TimeLoRA layers (no ...lora_table.weight): a baseline snapshot?')
    steps = len(next(iter(tables.values())))
    stride = int(np.ceil(steps / args.max_steps))
    chosen = torch.arange(0, steps, stride)
    every = f' (every {stride} steps: {len(chosen)} of them)' if stride > 1 else ''
    print(f'{len(tables)} TimeLoRA layers, T = {steps} time steps{every}')
    weights = {name: table[chosen].detach().float() for name, table in tables.items()} # saved as Parameters: no autograd here
    axis = Axis(values=chosen.numpy(), label='t', log=False, span=steps)
    return weights, axis, f'time steps {chosen[0]} to {chosen[-1]} of T = {steps}{every}', 'time steps'


# ---------------------------------------------------------------------------- nano diffusion: TimeLoRA, UC-LoRA

def nano_maps(checkpoint, args):
    """The composition weights of nano.py's network at the steps of its omega_similarity.png, with nano's own
    code: the network built as nano.py builds it, its weights as nano_lora reads them (see READERS)."""
    options = checkpoint['options']
    if options.get('cond') == 'shift':
        raise SnapshotError('a run with --cond shift: no LoRA layers, no composition weights')
    import_vendor_tree('dataflowr', TOOL)
    import nano
    import nano_lora
    import nano_metrics
    network = nano.build_network(argparse.Namespace(**options))
    network.load_state_dict(checkpoint['network'])
    print(f'MyTinyUNet, cond={options["cond"]}, after {checkpoint["epoch"]} epochs')
    with torch.no_grad():
        weights = nano_lora.composition_weights(network.eval(), nano_metrics.SIMILARITY_STEPS)
    steps = nano_metrics.STEPS_AXIS.values
    conditions = f'time steps {steps[0]} to {steps[-1]} of T = {nano_metrics.STEPS_AXIS.span} (every {steps[1] - steps[0]} steps, as in omega_similarity.png)'
    return dict(zip(nano_metrics.layer_names(network), weights)), nano_metrics.STEPS_AXIS, conditions, 'time steps'


# Each kind's reader: (snapshot contents, options) -> ({layer name: [S, m] composition weights} in network
# order, the Axis of the S conditions, the conditions in words, what a condition is called in the plural).
READERS = dict(edm=edm_maps, iddpm=iddpm_maps, nano=nano_maps)


# ---------------------------------------------------------------------------- output

def training_note(snapshot, kind, contents):
    """A line for the titles when the snapshot is of a smoke run or untrained: its maps then show how
    the composition weights start, not what training makes of them. '' otherwise."""
    if any(part.endswith('-smoke') for part in os.path.abspath(snapshot).split(os.sep)): # tools.paper.rows names smoke runs so
        return 'SMOKE RUN (barely trained): these maps show its initialisation'
    trained = contents['epoch'] if kind == 'nano' else next(iter(re.findall(r'(\d+)\D*$', os.path.basename(snapshot))), None)
    if trained is not None and int(trained) == 0:
        return 'UNTRAINED (step 0): these maps show its initialisation'
    return ''



def distance_rule(axis):
    """What near and far mean on this axis, in words."""
    unit = 'ln sigma' if axis.log else axis.label
    return dict(near=f"0 < |{unit} - {unit}'| <= {round(NEAR * axis.span, 2):g}", far=f"|{unit} - {unit}'| >= {round(FAR * axis.span, 2):g}")


def summary(similarity, axis):
    near, far = near_and_far(similarity, axis)
    rounded = lambda value: None if value is None else round(value, 3) + 0.0 # + 0.0: no -0.0 in the JSON
    return dict(near=rounded(near), far=rounded(far))


def write_maps(weights, axis, conditions, between, snapshot, kind, out, each_layer, note=''):
    """The PNGs, similarity.json and similarity.npz of one snapshot's composition weights {layer: [S, m]};
    note (training_note) heads every title."""
    names = list(weights)
    layers = torch.stack([cosine_similarity(w) for w in weights.values()])
    layers, mean = layers.numpy(), layers.mean(0).numpy() # the mean as nano_metrics takes it: the same numbers
    mean_summary = summary(mean, axis)
    os.makedirs(out, exist_ok=True)
    source = os.path.join(os.path.basename(os.path.dirname(os.path.abspath(snapshot))), os.path.basename(snapshot)) # run folder and file
    source = f'{note}\n{source}' if note else source
    about = f'cosine similarity of composition weights between {between}'
    save_heatmap(os.path.join(out, 'mean.png'), mean, axis, f'{source}\n{about}\n'
                 f'mean over {len(names)} layers; near {between}: {mean_summary["near"]}, far ones: {mean_summary["far"]}')
    save_layer_grid(os.path.join(out, 'layers.png'), layers, names, axis, f'{source}\n{about}, per layer')
    if each_layer:
        os.makedirs(os.path.join(out, 'layers'), exist_ok=True)
        for name, layer in zip(names, layers):
            save_heatmap(os.path.join(out, 'layers', f'{name}.png'), layer, axis, f'{source}\n{about}\nlayer {name}')
    with open(os.path.join(out, 'similarity.json'), 'w') as f:
        json.dump(dict(snapshot=snapshot, kind=kind, note=note, conditions=conditions, **distance_rule(axis),
                       mean=mean_summary, layers={name: summary(layer, axis) for name, layer in zip(names, layers)}), f, indent=2)
    np.savez(os.path.join(out, 'similarity.npz'), conditions=axis.values, names=np.array(names),
             weights=np.stack([w.numpy() for w in weights.values()]), layers=layers, mean=mean)
    return mean_summary


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('snapshot', help='EDM network-snapshot-*.pkl, IDDPM model*.pt / ema_*.pt, or nano.py\'s checkpoint.pt')
    parser.add_argument('--out', help='output folder (default: composition-maps-<snapshot name> beside the snapshot)')
    parser.add_argument('--kind', choices=KINDS, help='the snapshot\'s upstream (default: told by the file; given, it is checked)')
    parser.add_argument('--each-layer', action='store_true', help='also one full-size PNG a layer, in <out>/layers/')
    parser.add_argument('--sigmas', type=int, default=64, help='EDM: noise levels, log-spaced from --sigma-min to --sigma-max')
    parser.add_argument('--sigma-min', type=float, default=SIGMA_MIN, help='EDM: lowest noise level')
    parser.add_argument('--sigma-max', type=float, default=SIGMA_MAX, help='EDM: highest noise level')
    parser.add_argument('--class', dest='class_index', type=int, default=0, help='EDM: class of the one-hot label of a conditional network')
    parser.add_argument('--max-steps', type=int, default=200, help='IDDPM: at most this many time steps, evenly spaced (every k-th)')
    args = parser.parse_args(argv)
    if args.sigmas < 2 or args.max_steps < 2:
        parser.error('--sigmas and --max-steps must be at least 2')
    if not 0 < args.sigma_min < args.sigma_max:
        parser.error('need 0 < --sigma-min < --sigma-max')
    return args


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isfile(args.snapshot):
        sys.exit(f'{TOOL}: {args.snapshot}: no such file')
    stem = os.path.splitext(os.path.basename(args.snapshot))[0]
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.snapshot)), f'composition-maps-{stem}')
    try:
        kind, contents = read_snapshot(args.snapshot)
        if args.kind and args.kind != kind:
            raise SnapshotError(f'a snapshot of {kind}, not of {args.kind} (--kind)')
        print(f'{args.snapshot}: {kind} snapshot')
        weights, axis, conditions, between = READERS[kind](contents, args)
    except SnapshotError as err:
        sys.exit(f'{TOOL}: {args.snapshot}: {err}')
    print(f'{len(weights)} adapted layers; composition weights at {conditions}')
    note = training_note(args.snapshot, kind, contents)
    if note:
        print(note)
    mean = write_maps(weights, axis, conditions, between, args.snapshot, kind, out, args.each_layer, note)
    print(f'mean over layers: near {mean["near"]}, far {mean["far"]} ({distance_rule(axis)["near"]}; {distance_rule(axis)["far"]})')
    print(f'wrote {out}/: mean.png, layers.png'
          + (f', layers/ ({len(weights)} PNGs)' if args.each_layer else '') + ', similarity.json, similarity.npz')


if __name__ == '__main__':
    with interruptible('make composition-maps', resumes=False): # Ctrl-C: one line, no traceback
        main()
