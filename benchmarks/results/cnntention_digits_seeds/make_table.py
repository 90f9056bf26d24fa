"""Writes README.md of this folder from the run folders beside it: python make_table.py (from this folder)."""
import csv
import glob
import json
import statistics as st
from pathlib import Path

HERE = Path(__file__).parent
WHAT = {
    'paired': 'resnet20_selfatt, current code (attention drawn after the backbone), default recipe',
    'r20': 'resnet20, default recipe (its initialisation is the same before and after the change)',
    'base': 'resnet20_selfatt before the paired initialisation (commit 3b5a735), default recipe',
    'sameinit': "base, started from resnet20's seed-42 initial network (sameinit.py: a diagnostic)",
    'ema99': 'base, plus --model-ema --model-ema-decay 0.99 (stopped after 3 seeds)',
    'ep30': 'base, --epochs 30 (stopped after seed 1)',
}
lines = [
    '# resnet20_selfatt and resnet20 on digits, default recipe, by seed', '',
    'Each folder is one `python train.py --model M --seed S [flags]` run (results.json, summary.csv and config.yaml '
    'as the run wrote them) on a 2-core Intel Xeon CPU, torch 2.14.1, 2026-12-02. Test top-1 is that of the '
    'best-validation weights; "last": of the last epoch. Written by make_table.py from those files.', '',
    '| runs | what | seeds | val top-1 (best epoch) | val NLL (last epoch) | test top-1 per seed | mean test top-1 |',
    '|---|---|---|---|---|---|---|']
for name, what in WHAT.items():
    rows = []
    for folder in sorted(glob.glob(str(HERE / f'{name}.s*')), key=lambda p: int(p.rsplit('.s', 1)[1])):
        result = json.loads(Path(folder, 'results.json').read_text())
        summary = list(csv.DictReader(open(Path(folder, 'summary.csv'))))
        rows.append((int(folder.rsplit('.s', 1)[1]), result['val_top1_best'], float(summary[-1]['val_loss']),
                     result['top1'], result['test_last_epoch']['top1']))
    tests = [row[3] for row in rows]
    spread = f' ± {st.stdev(tests):.2f}' if len(tests) > 1 else ''
    per_seed = ', '.join(f'{seed}: {test:.2f} (last {last:.2f})' for seed, _, _, test, last in rows)
    lines.append(f'| {name} | {what} | {len(rows)} | {st.mean(r[1] for r in rows):.2f} | '
                 f'{st.mean(r[2] for r in rows):.3f} | {per_seed} | {st.mean(tests):.2f}{spread} |')
(HERE / 'README.md').write_text('\n'.join(lines) + '\n')
