"""What this project changes in each upstream: pinned commit, patch series, diffstat, overlay files.

    python -m tools.vendoring.audit [UPSTREAM ...]     # default: every upstream under patches/

Upstream lines changed = lines added + lines removed in upstream files, counted by `git apply
--numstat` on each patch file. Patches with "lora" in their name are the LoRA change proper; the
others (compatibility with current PyTorch and NumPy, upstream bug fixes, flag plumbing) are not.
Exit status 1 if the LoRA patches of an upstream exceed the line budget its UPSTREAM file sets
(`lora_line_budget:`): the LoRA change proper stays small, everything else goes in other patches.
"""

import os
import subprocess
import sys

from tools import ROOT
from tools.vendoring.upstream import VendorError, overlay_files, patch_header, read_series, read_upstream, upstream_names


def numstat(patch):
    """[(added, removed, path)] of a patch file, without applying it."""
    out = subprocess.run(['git', 'apply', '--numstat', patch], cwd=ROOT, text=True, stdout=subprocess.PIPE, check=True).stdout
    rows = []
    for line in out.splitlines():
        added, removed, path = line.split('\t')
        rows.append((int(added), int(removed), path))
    return rows


def audit(name):
    upstream = read_upstream(name)
    print(f'== {name}: {upstream["url"]} at {upstream["commit"]}')
    print(f'   licence: {upstream["licence"]}')
    lora_lines, lora_patches = 0, 0
    for index, patch in enumerate(read_series(name), 1):
        rows = numstat(patch)
        added, removed = sum(r[0] for r in rows), sum(r[1] for r in rows)
        kind = 'LoRA' if 'lora' in os.path.basename(patch) else 'other'
        if kind == 'LoRA':
            lora_lines += added + removed
            lora_patches += 1
        subject = patch_header(patch)[2].splitlines()[0]
        print(f'\n   {index}. {os.path.relpath(patch, ROOT)} ({kind})')
        print(f'      {subject}')
        for file_added, file_removed, path in rows:
            print(f'      {path:40s} +{file_added:<4d} -{file_removed:<4d} {"+" * min(file_added, 40)}{"-" * min(file_removed, 40)}')
        print(f'      {len(rows)} upstream files, {added + removed} lines changed (+{added} -{removed})')
    print('\n   overlay (copied in, not upstream code):')
    if not overlay_files(name, upstream):
        print('      none')
    for source, destination in overlay_files(name, upstream):
        with open(source) as f:
            lines = sum(1 for _ in f)
        print(f'      {os.path.relpath(source, ROOT):44s} -> {destination:28s} {lines:5d} lines')
    budget = int(upstream['lora_line_budget']) if 'lora_line_budget' in upstream else None
    within = budget is None or lora_lines <= budget
    verdict = 'no budget set' if budget is None else f'budget {budget}: {"within" if within else "OVER"}'
    if lora_patches:
        print(f'\n   LoRA patches change {lora_lines} upstream lines ({verdict})\n')
    else:
        print(f'\n   no LoRA patch yet ({verdict})\n')
    return within


def main():
    names = sys.argv[1:] or upstream_names()
    try:
        results = [audit(name) for name in names]
    except VendorError as err:
        sys.exit(f'audit: {err}')
    sys.exit(0 if all(results) else 1)


if __name__ == '__main__':
    main()
