"""The resume state of a training run: ``resume.pt`` (optimizer, RNG states, history) beside
``prefix.safetensors`` / ``head.safetensors`` (the last epoch's weights), all in the run's ``last``
checkpoint folder (``run_folder``: written as a unit with the best checkpoint and verified before loading).

``resume.pt`` is read with ``weights_only=True``: no pickled code ever runs.
"""

from __future__ import annotations

from pathlib import Path

import torch


def load_resume_state(path: Path) -> dict:
    """``resume.pt`` read with ``weights_only=True``: tensors, numbers, strings and containers only, so a
    crafted file can never run code (torch refuses any other pickled object)."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # UnpicklingError for foreign objects, EOFError/RuntimeError for a damaged file
        raise ValueError(f"{path} cannot be resumed from: it is not a ptv2_fast resume state, or it is damaged "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); nothing in it was "
                         "executed. Start the run again without --resume, or into a new --out") from None
    need = ("optimizer", "rng", "torch_rng", "history", "best", "epoch", "stale")
    missing = [k for k in need if k not in state] if isinstance(state, dict) else list(need)
    if missing:
        raise ValueError(f"{path} is not a ptv2_fast resume state (it lacks {missing})")
    state["rng"] = _as_rng_state(state["rng"])
    return state


def _as_rng_state(s):
    # random.Random.setstate needs (int, tuple of ints, None or float); a round trip may turn tuples into lists
    return (s[0], tuple(s[1]), s[2]) if isinstance(s, (list, tuple)) and len(s) == 3 else s


def save_resume(folder: Path, state, opt, rng, history, best, epoch, stale) -> None:
    """Write the last epoch's weights (``state``: (bank, head) state dicts) and ``resume.pt`` into ``folder``
    (a staging folder that ``RunFolder.commit`` seals and renames into place)."""
    from safetensors.torch import save_file

    save_file(state[0], str(folder / "prefix.safetensors"))
    if state[1] is not None:
        save_file(state[1], str(folder / "head.safetensors"))
    torch.save({"optimizer": opt.state_dict(), "rng": rng.getstate(), "torch_rng": torch.get_rng_state(),
                "history": history, "best": best, "epoch": epoch, "stale": stale}, folder / "resume.pt")
