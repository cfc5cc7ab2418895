"""The README's commands run as written: only flags the parsers know, and the released models' own
sampling settings (models.fractalgen.RELEASED) wherever a released model is trained or evaluated."""
import os
import re
import shlex

import pytest

import main_fractalgen
import util.sample
from helpers import ROOT
from models.fractalgen import RELEASED

README = open(os.path.join(ROOT, "README.md")).read()
BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def commands(program):
    """The README's command lines that run `program`, as token lists (continuation lines joined)."""
    lines = [line.split("#")[0] for block in BLOCKS for line in block.replace("\\\n", " ").splitlines()]
    return [shlex.split(line) for line in lines if program in line]


def known_flags(parser):
    return {flag for action in parser._actions for flag in action.option_strings}


@pytest.mark.parametrize("program, parser", [("main_fractalgen.py", main_fractalgen.get_args_parser()),
                                             ("util.sample", util.sample.get_args_parser())])
def test_readme_commands_use_known_flags(program, parser):
    found = commands(program)
    assert found, f"the README shows no {program} command"
    unknown = {t for cmd in found for t in cmd[cmd.index(next(t for t in cmd if program in t)) + 1:]
               if t.startswith("--") and t not in known_flags(parser)}
    assert unknown == set()


def flag(cmd, name):
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_readme_uses_the_released_settings():
    evaluated, trained = set(), set()
    for cmd in commands("main_fractalgen.py"):
        model = flag(cmd, "--model")
        if model not in RELEASED or "--evaluate_nll" in cmd:
            continue
        released = RELEASED[model]
        assert float(flag(cmd, "--cfg")) == released["cfg"], cmd
        assert float(flag(cmd, "--temperature")) == released["temperature"], cmd
        assert flag(cmd, "--num_iter_list") == released["num_iter_list"], cmd
        assert flag(cmd, "--cfg_schedule") == released["cfg_schedule"], cmd
        assert int(flag(cmd, "--num_conds")) == released["num_conds"] and int(flag(cmd, "--img_size")) == released["img_size"]
        assert ("--guiding_pixel" in cmd) == released["guiding_pixel"], cmd
        (evaluated if "--evaluate_gen" in cmd else trained).add(model)
    assert evaluated == set(RELEASED)
    assert trained == {"fractalar_in64", "fractalmar_in64", "fractalmar_large_in256"}


def test_readme_table_of_released_models():
    for name, r in RELEASED.items():
        row = f"| {name} | {r['params']:.2f}M | {r['num_conds']} | {'yes' if r['guiding_pixel'] else 'no'} | " \
              f"{r['num_iter_list']} | {r['cfg']} | {r['temperature']} | {r['fid']:.2f} | {r['inception_score']} |"
        assert row in README, row


def test_quick_start_caption_states_the_demo_preset():
    """The picture's caption restates the preset that drew it: it must follow DEMO_DEFAULTS."""
    d = main_fractalgen.DEMO_DEFAULTS
    caption = re.search(r"\*What the Quick start below gives:(.*?)\*", README, flags=re.S).group(1)
    caption = " ".join(caption.split())
    expected = [d["model"], f"{d['epochs']} epochs", f"cfg {d['cfg']} {d['cfg_schedule']}",
                f"temperature {d['temperature']}"] + (["without flips"] if d["no_flip"] else [])
    assert all(fact in caption for fact in expected), (expected, caption)
    assert f"`--final_samples {d['final_samples']}`" in README  # the preset's list in the Quick start
