"""The helpers the package and the benchmarks share for reports: Markdown tables, machine descriptions,
summary.csv."""
import math
import os

import pytest
import torch

from timm_gradattn.reporting import (
    describe_machine, load_average, machine_line, markdown_cell, markdown_table, read_summary_csv)


def test_markdown_table_formats_and_escapes_cells():
    table = markdown_table(['name', 'value'], [['a|b', 0.123456789], ['sizes', {'train': 3, 'val': None}],
                                               ['list', (1, 2)], ['text', 'two\nlines']])
    assert table.splitlines() == [
        '| name | value |', '|---|---|', '| a\\|b | 0.123457 |', '| sizes | train: 3 |', '| list | 1, 2 |',
        '| text | two lines |']
    assert markdown_cell(1) == '1' and markdown_table(['x'], []) == '| x |\n|---|'


def test_describe_machine_records_hardware_versions_and_how_it_ran():
    machine = describe_machine('cpu', num_processes=2, mixed_precision='no')
    assert machine['cpu_count'] == os.cpu_count() and machine['torch_threads'] == torch.get_num_threads()
    assert machine['device'] == 'cpu' and machine['gpu'] is None
    assert machine['num_processes'] == 2 and machine['mixed_precision'] == 'no'
    assert machine['torch'] == torch.__version__ and machine['timm'] and machine['accelerate']
    assert machine['cpu'] in machine_line(machine) and '2 process(es)' in machine_line(machine)


@pytest.mark.parametrize('machine, expected', [
    (dict(cpu='EPYC', cpu_count=2, torch_threads=2, gpu=None, torch='2.0'), 'EPYC (2 cores, 2 torch threads)'),
    (dict(cpu='EPYC', cores='2', threads='2', device='cpu', torch='2.0'), 'EPYC (2 cores, 2 torch threads)'),  # speed.json
    (dict(cpu='EPYC', cpu_count=16, gpus=['H200', 'H200'], torch='2.0'), 'H200, H200 with EPYC (16 cores)'),  # run.json
    (dict(cpu='EPYC', cpu_count=16, gpu='H200', num_processes=4, torch='2.0'), 'H200 with EPYC (16 cores)'),
])
def test_machine_line_reads_current_and_older_records(machine, expected):
    line = machine_line(machine)
    assert line.startswith(expected) and 'torch 2.0' in line
    assert machine_line('test fixture') == 'test fixture'


def test_load_average():
    load = load_average()
    assert load is None or len(load) == 3


def test_read_summary_csv(tmp_path):
    path = tmp_path / 'summary.csv'
    path.write_text('epoch,val_top1,lr\n1,50.5,0.001\n2,,0.001\n')
    rows = read_summary_csv(path)
    assert rows[0] == {'epoch': 1.0, 'val_top1': 50.5, 'lr': 0.001} and math.isnan(rows[1]['val_top1'])
    path.write_text('epoch,val_top1\n')
    with pytest.raises(ValueError, match='has no rows'):
        read_summary_csv(path)
