"""FractalGen's models. They (and util/checkpoint.py) use torch APIs added in 2.4
(torch.amp.is_autocast_available, torch.serialization.add_safe_globals), so an older torch is
refused here, by its version, rather than by an AttributeError in the middle of a run."""
import re

import torch

MIN_TORCH = (2, 4)

if tuple(int(n) for n in re.findall(r"\d+", torch.__version__)[:2]) < MIN_TORCH:
    raise ImportError(f"FractalGen needs torch {'.'.join(map(str, MIN_TORCH))} or newer, found torch {torch.__version__}: "
                      "upgrade it (requirements.txt pins the tested one)")
