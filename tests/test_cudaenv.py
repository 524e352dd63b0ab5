"""The allocator settings lowbit adds before torch loads."""

from lowbit.cudaenv import PINNED, tune_pinned_allocator


def test_pinned_settings_are_added_and_the_users_are_kept():
    env: dict[str, str] = {}
    assert tune_pinned_allocator(env) == "PYTORCH_CUDA_ALLOC_CONF" and env == {"PYTORCH_CUDA_ALLOC_CONF": PINNED}
    env = {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}
    assert tune_pinned_allocator(env) == "PYTORCH_ALLOC_CONF"
    assert env == {"PYTORCH_ALLOC_CONF": f"expandable_segments:True,{PINNED}"}
    mine = {"PYTORCH_CUDA_ALLOC_CONF": "pinned_num_register_threads:2"}
    assert tune_pinned_allocator(mine) is None and mine == {"PYTORCH_CUDA_ALLOC_CONF": "pinned_num_register_threads:2"}


def test_the_cli_sets_them_before_torch_loads():
    """A fresh interpreter importing the CLI: the settings are in place, and torch came after them."""
    import subprocess
    import sys

    code = ("import os, sys; import lowbit.cudaenv as c; f = c.tune_pinned_allocator; seen = []; "
            "c.tune_pinned_allocator = lambda: (seen.append('torch' in sys.modules), f())[1]; "
            "import lowbit.cli; print(seen, os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))")
    env = {k: v for k, v in __import__("os").environ.items() if "ALLOC_CONF" not in k}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == f"[False] {PINNED}"
