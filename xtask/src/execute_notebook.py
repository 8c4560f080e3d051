"""Run one notebook in its Jupyter kernel, as `jupyter execute` does, for `cargo xtask notebooks`.

usage: execute_notebook.py NOTEBOOK OUTPUT WORKDIR LOCKFILE EVCXR_LOCKFILE [FEATURES]

The kernel starts in WORKDIR, so the notebook's relative paths (its `:dep convkit = { path = ".." }`
line among them) resolve as they do when a person opens it. With FEATURES (comma-separated), the
features on the notebook's `:dep convkit` line are replaced by these, in memory only: CI runs the
notebooks under the test build's feature set so that evcxr reuses the tests' compiled
dependencies. LOCKFILE (the workspace's Cargo.lock) is copied to EVCXR_LOCKFILE once the kernel
has started and before the first cell: evcxr compiles an empty crate when it starts, which prunes
any lock file in its folder to nothing, so that the first `:dep` would resolve every dependency to
its newest version instead of the tested ones. Every cell runs; the caller reads the executed
notebook in OUTPUT for failures.
"""

import re
import shutil
import sys

import nbformat
from nbclient import NotebookClient

DEP_LINE = re.compile(r"^(:dep convkit = \{.*features = \[)[^\]]*(\].*)$", re.MULTILINE)


def with_features(nb, path, features):
    listed = ", ".join(f'"{f}"' for f in features.split(","))
    found = 0
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.source, n = DEP_LINE.subn(lambda m: m.group(1) + listed + m.group(2), cell.source)
            found += n
    if found != 1:
        sys.exit(f'{path}: expected one `:dep convkit = {{ path = "..", features = [...] }}` line, found {found}')


def main():
    if len(sys.argv) not in (6, 7):
        sys.exit(__doc__)
    path, output, workdir, lockfile, evcxr_lockfile = sys.argv[1:6]
    nb = nbformat.read(path, as_version=4)
    if len(sys.argv) == 7 and sys.argv[6]:
        with_features(nb, path, sys.argv[6])
    client = NotebookClient(
        nb,
        timeout=3600,
        startup_timeout=120,
        allow_errors=True,
        resources={"metadata": {"path": workdir}},
    )
    # What NotebookClient.execute does, with the lock file copied once the kernel is up.
    client.reset_execution_trackers()
    with client.setup_kernel():
        info = client.wait_for_reply(client.kc.kernel_info())
        if info is not None and "language_info" in info["content"]:
            nb.metadata["language_info"] = info["content"]["language_info"]
        shutil.copyfile(lockfile, evcxr_lockfile)
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index, execution_count=client.code_cells_executed + 1)
    nbformat.write(nb, output)


if __name__ == "__main__":
    main()
