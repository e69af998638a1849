"""Parameter counts of the paper's rows, built from the real networks in vendor/.

    python -m tools.paper.params            # table: paper count, ours, difference, match
    python -m tools.paper.params --json     # the same rows as JSON

The paper's counts come from the table of paper rows (tools/paper/rows.py); ours from constructing
the patched upstream network with the flags of that row, as the upstream's training script would.
Tables 1 and 2 give counts; Table 3 (adaLN vs LoRA) and Fig. 5 (ClassLoRA) give none: ours only.
"""

import argparse
import json

from tools.paper.rows import edm_classes, flag_value, rows
from tools.vendoring.upstream import import_vendor_tree

# The network keyword arguments that EDM's train.py builds for --arch=ddpmpp --precond=edm; the
# flags below change them as train.py does.
EDM_DDPMPP = dict(class_name='training.networks.EDMPrecond', model_type='SongUNet', embedding_type='positional',
    encoder_type='standard', decoder_type='standard', channel_mult_noise=1, resample_filter=[1,1], model_channels=128,
    channel_mult=[2,2,2], img_channels=3)
EDM_LORA_FLAGS = {'--lora': ('lora', str), '--lora-bases': ('lora_bases', int), '--lora-rank': ('lora_rank', int),
                  '--lora-mlp': ('lora_mlp', lambda widths: [int(w) for w in widths.split(',')]), '--lora-scale': ('lora_scale', str),
                  '--adaln': ('adaln', lambda value: value == 'True')}


def edm_network_kwargs(row):
    """What train.py passes to the network for this row's flags (EDM's defaults for the rest)."""
    flags = row.flags
    if flag_value(flags, '--arch', 'ddpmpp') != 'ddpmpp' or flag_value(flags, '--precond', 'edm') != 'edm':
        raise ValueError(f'{row.name}: only --arch=ddpmpp --precond=edm rows are counted')
    kwargs = dict(EDM_DDPMPP, img_resolution=row.recipe.resolution, dropout=float(flag_value(flags, '--dropout', 0.13)))
    kwargs['augment_dim'] = 9 if float(flag_value(flags, '--augment', 0.12)) > 0 else 0
    if flag_value(flags, '--cres') is not None:
        kwargs['channel_mult'] = [int(c) for c in flag_value(flags, '--cres').split(',')]
    if flag_value(flags, '--cbase') is not None: # the mini rows' width and depth (train.py --blocks: patch 0005)
        kwargs['model_channels'] = int(flag_value(flags, '--cbase'))
    if flag_value(flags, '--blocks') is not None:
        kwargs['num_blocks'] = int(flag_value(flags, '--blocks'))
    classes = edm_classes(row)
    if classes:
        kwargs['label_dim'] = classes
    for flag, (name, kind) in EDM_LORA_FLAGS.items():
        if flag_value(flags, flag) is not None:
            kwargs[name] = kind(flag_value(flags, flag))
    if flag_value(flags, '--conv-cond') is not None:
        kwargs['conv_cond'] = flag_value(flags, '--conv-cond') == 'True'
    return kwargs


def edm_count(row):
    """Trainable parameters of the EDM network of a row."""
    import_vendor_tree('edm', 'params')
    import dnnlib
    import torch
    with torch.device('meta'): # shapes only: no memory, no random numbers
        net = dnnlib.util.construct_class_by_name(**edm_network_kwargs(row))
    return sum(p.numel() for p in net.parameters())


def iddpm_options(row, *extra):
    """What image_train.py passes to create_model_and_diffusion() for this row's flags (and `extra` flags after
    them), parsed by its own parser. Needs vendor/improved-diffusion on the path (import_vendor_tree)."""
    from improved_diffusion.script_util import add_dict_to_argparser, args_to_dict, model_and_diffusion_defaults
    parser = argparse.ArgumentParser()
    add_dict_to_argparser(parser, model_and_diffusion_defaults())
    args = parser.parse_args([str(flag) for flag in (*row.flags, *extra)])
    return args_to_dict(args, model_and_diffusion_defaults().keys())


def iddpm_count(row):
    """Trainable parameters of the model that image_train.py builds from this row's flags."""
    import_vendor_tree('improved-diffusion', 'params')
    import torch
    from improved_diffusion.script_util import create_model_and_diffusion
    with torch.device('meta'):
        model, _ = create_model_and_diffusion(**iddpm_options(row))
    return sum(p.numel() for p in model.parameters())


# EDM2: what train_edm2.py builds (setup_training_config) from a row's flags over its preset's values.
EDM2_FLAGS = {'--channels': ('model_channels', int), '--dropout': ('dropout', float), '--cres': ('channel_mult', lambda v: [int(c) for c in v.split(',')]),
              '--blocks': ('num_blocks', int), '--channels-per-head': ('channels_per_head', int)}
EDM2_LORA_FLAGS = {'--lora': ('lora', str), '--lora-bases': ('lora_bases', int), '--lora-rank': ('lora_rank', int),
                   '--lora-mlp': ('lora_mlp', lambda widths: [int(w) for w in widths.split(',')]), '--conv-cond': ('conv_cond', lambda value: value == 'True')}


def edm2_preset(row):
    """train_edm2.py's preset of the row (its default where the row names none): the values its flags leave out;
    needs vendor/edm2 on the path (import_vendor_tree)."""
    from train_edm2 import config_presets
    return config_presets[flag_value(row.flags, '--preset', 'edm2-img512-s')]


def edm2_network_kwargs(row):
    """What train_edm2.py passes to Precond for this row's flags (its preset's values for the rest); needs vendor/edm2
    on the path (import_vendor_tree)."""
    flags = row.flags
    preset = edm2_preset(row)
    kwargs = dict(class_name='training.networks_edm2.Precond', model_channels=preset.channels, dropout=preset.dropout,
                  img_resolution=row.recipe.resolution, img_channels=3)
    for flag, (name, kind) in {**EDM2_FLAGS, **EDM2_LORA_FLAGS}.items():
        if flag_value(flags, flag) is not None:
            kwargs[name] = kind(flag_value(flags, flag))
    kwargs['label_dim'] = edm_classes(row)
    return kwargs


def edm2_count(row):
    """Trainable parameters of the EDM2 network of a row."""
    import_vendor_tree('edm2', 'params')
    import dnnlib
    import torch
    with torch.device('meta'):
        net = dnnlib.util.construct_class_by_name(**edm2_network_kwargs(row))
    return sum(p.numel() for p in net.parameters())


COUNTERS = {'edm': edm_count, 'iddpm': iddpm_count, 'edm2': edm2_count}


def counted_rows():
    """(table, row) for every row with a parameter count in the paper, table by table."""
    for upstream in COUNTERS:
        for table in ['Table 1', 'Table 2']:
            counted = [row for row in rows(upstream=upstream, table=table) if row.paper_params is not None]
            if table == 'Table 2': # the paper's order: 9, 18, 36 bases at rank 4, then ranks 2 and 8
                counted.sort(key=lambda row: (row.lora_rank != 4, row.lora_rank, row.lora_bases))
            for row in counted:
                yield table, row


def uncounted_rows():
    """(table, row) for the rows without a parameter count in the paper: Table 3 and Fig. 5, and EDM2's (not in the paper)."""
    for table in ['Table 3', 'Fig. 5']:
        for row in sorted(rows(upstream='edm', table=table), key=lambda row: (row.dataset != 'cifar10-uncond', row.variant)):
            yield table, row
    for row in rows(upstream='edm2'):
        yield 'EDM2', row


def results():
    bases = {}
    for table, row in counted_rows():
        ours = COUNTERS[row.upstream](row)
        yield dict(upstream=row.upstream, table=table, row=row.title(table), paper=row.paper_params, ours=ours,
                   difference=ours - row.paper_params, match=ours == row.paper_params, note=row.note if row.rules_params else None)
    for table, row in uncounted_rows():
        ours = COUNTERS[row.upstream](row)
        if row.variant == 'baseline':
            bases[row.recipe] = ours
        # EDM2's rows: beside the baseline, what LoRA adds (not in the paper: its share is the comparison to make)
        added = f'{ours - bases[row.recipe]:+,} on the baseline ({(ours - bases[row.recipe]) / bases[row.recipe]:+.1%})' \
            if table == 'EDM2' and row.variant != 'baseline' and row.recipe in bases else None
        yield dict(upstream=row.upstream, table=table, row=row.title(table), paper=None, ours=ours, difference=None, match=None, note=added)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--json', action='store_true', help='print JSON instead of a table')
    args = parser.parse_args()
    table = list(results())
    if args.json:
        print(json.dumps(table, indent=2))
        return
    print(f'{"upstream":8s} {"table":7s} {"row":44s} {"paper":>12s} {"ours":>12s} {"diff":>8s}  match')
    for r in table:
        if r['paper'] is None: # the paper gives no count
            where = 'not a paper row' if r['table'] == 'EDM2' else f'no count in {r["table"]}'
            print(f'{r["upstream"]:8s} {r["table"]:7s} {r["row"]:44s} {"-":>12s} {r["ours"]:12,d} {"":>8s}  ({where}){": " + r["note"] if r["note"] else ""}')
            continue
        print(f'{r["upstream"]:8s} {r["table"]:7s} {r["row"]:44s} {r["paper"]:12,d} {r["ours"]:12,d} {r["difference"]:+8,d}  '
              f'{"yes" if r["match"] else "NO"}{": " + r["note"] if r["note"] else ""}')
    counted = [r for r in table if r['paper'] is not None]
    print(f'\n{sum(r["match"] for r in counted)} of {len(counted)} rows with a count in the paper match it exactly.')


if __name__ == '__main__':
    main()
