"""Extract nano diffusion's model and DDPM code from Dataflowr's notebook into a Python module.

    python -m tools.vendoring.notebook Module18/ddpm_nano_sol.ipynb nano_diffusion.py

(tools.vendoring.build calls extract() on the notebook at the pinned commit.)

Keeps, verbatim and in notebook order, the top-level definitions listed in KEEP: the model
(sinusoidal_embedding, MyConv, MyTinyBlock, MyTinyUp, MyTinyUNet) and the DDPM process, whose
add_noise, reverse and step are all that a training or sampling step needs. Leaves out plotting,
the dataset download, the notebook's training_loop and generate_image (they take a DataLoader and
collect frames for plots; overlay/dataflowr/nano.py has its own resumable, seeded loops over the
same DDPM methods) and the notebook's top-level runs. The output depends only on the notebook's
text, so the same notebook always gives the same module (the patches in patches/dataflowr apply
to it). An expected definition that is missing is an error.
"""

import ast
import json
import sys
import textwrap

KEEP = ['device', 'sinusoidal_embedding', 'MyConv', 'MyTinyBlock', 'MyTinyUp', 'MyTinyUNet', 'DDPM']

HEADER = '''"""Nano diffusion (DDPM on MNIST), extracted from Dataflowr's notebook {notebook}.

Written by tools/vendoring/notebook.py: the notebook's definitions of
{names}, verbatim.
Not extracted: plotting, the MNIST download, training_loop, generate_image and the notebook's
top-level runs.
Dataflowr notebooks: https://github.com/dataflowr/notebooks (Apache-2.0).
"""

# The notebook's imports that these definitions use (it also imports torch.nn.functional and tqdm,
# for its training loop and sampler, and torchvision, matplotlib and numpy, for data and plots).
import torch
from torch import nn
'''


def defined_names(node):
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [target.id for target in node.targets if isinstance(target, ast.Name)]
    return []


def extract(notebook, notebook_path):
    """The module's text from a notebook's parsed JSON; notebook_path names it in the header and errors."""
    found = {}
    for cell in notebook['cells']:
        if cell['cell_type'] != 'code':
            continue
        source = ''.join(cell['source'])
        for node in ast.parse(source).body:
            for name in defined_names(node):
                if name in KEEP:
                    found[name] = (len(found), ast.get_source_segment(source, node))
    missing = [name for name in KEEP if name not in found]
    if missing:
        raise ValueError(f'{notebook_path} does not define {", ".join(missing)}')
    ordered = [segment for _, segment in sorted(found.values())]
    header = HEADER.format(notebook=notebook_path.split('/')[-1], names=textwrap.fill(', '.join(KEEP), width=96))
    return header + '\n\n' + '\n\n\n'.join(ordered) + '\n'


def main():
    if len(sys.argv) != 3:
        sys.exit('usage: python -m tools.vendoring.notebook NOTEBOOK.ipynb OUT.py')
    try:
        with open(sys.argv[1]) as f:
            module = extract(json.load(f), sys.argv[1])
    except (OSError, ValueError, KeyError, SyntaxError) as err:
        sys.exit(f'notebook: {err}')
    with open(sys.argv[2], 'w') as f:
        f.write(module)


if __name__ == '__main__':
    main()
