#!/usr/bin/env bash
# Build fusion_attn with colcon, as on a robot (ament_python), into a throwaway workspace, and check
# that the install tree holds what `ros2 run` / `ros2 launch` need. Exits non-zero naming what is missing.
# Usage (from anywhere): tools/colcon_check.sh [VENV]   VENV: the venv whose colcon to use (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
pkg=fusion_attn
ws="$(mktemp -d "${TMPDIR:-/tmp}/fusion_attn-colcon.XXXXXX")"
trap 'rc=$?; if [ "$rc" -eq 0 ]; then rm -rf "$ws"; else echo "colcon-check: workspace kept for inspection: $ws" >&2; fi' EXIT

# --base-paths .: the repository root is the package, so colcon stops there and never crawls into
# .venv (the ROS wheels put package.xml files under .venv/share) or anything else below the root.
found="$("$venv/bin/colcon" --log-base "$ws/log" list --names-only --base-paths .)"
if [ "$found" != "$pkg" ]; then
    echo "colcon-check: FAILED: colcon should find exactly the package '$pkg' here, found: ${found:-nothing}" >&2
    exit 1
fi

echo "colcon-check: colcon build of $pkg into $ws"
"$venv/bin/colcon" --log-base "$ws/log" build --base-paths . --packages-select "$pkg" --merge-install \
    --build-base "$ws/build" --install-base "$ws/install"
install="$ws/install"

missing=()
need() { [ -e "$install/$1" ] || missing+=("$1"); }
need_exec() { [ -f "$install/$1" ] && [ -x "$install/$1" ] || missing+=("$1 (executable)"); }

need_exec "lib/$pkg/fusion-attn"
need "share/$pkg/package.xml"
need "share/ament_index/resource_index/packages/$pkg"
# Every file of launch/ and config/ must be installed (setup.py's data_files globs must cover them).
while IFS= read -r f; do
    need "share/$pkg/$f"
done < <(find launch config -type f ! -path '*/__pycache__/*' ! -name '*.pyc' 2>/dev/null | sort)

site="$(cd "$install" && find . -path "*-packages/$pkg/__init__.py" | head -n 1)"
if [ -z "$site" ]; then
    missing+=("lib/python3*/site-packages/$pkg (the Python package)")
else
    site="${site#./}"; site="${site%/$pkg/__init__.py}"
    need "$site/rl/__init__.py"
    # Package data (setup.py's package_data) must ship too.
    while IFS= read -r f; do
        need "$site/$f"
    done < <(find "$pkg/backends" -maxdepth 1 -type f -name '*.txt'; [ -d "$pkg/data" ] && find "$pkg/data" -type f ! -path '*/__pycache__/*'; true)
fi

if [ "${#missing[@]}" -ne 0 ]; then
    echo "colcon-check: FAILED: missing from the colcon install tree ($install):" >&2
    printf '  %s\n' "${missing[@]}" >&2
    exit 1
fi

# The installed command must start as `ros2 run fusion_attn fusion-attn` would start it.
echo "colcon-check: lib/$pkg/fusion-attn --help"
if ! PYTHONPATH="$install/$site${PYTHONPATH:+:$PYTHONPATH}" "$install/lib/$pkg/fusion-attn" --help >/dev/null; then
    echo "colcon-check: FAILED: the installed lib/$pkg/fusion-attn --help did not exit 0" >&2
    exit 1
fi
echo "colcon-check: OK: lib/$pkg/fusion-attn, package.xml, ament index marker, $(find launch config -type f ! -path '*/__pycache__/*' ! -name '*.pyc' 2>/dev/null | wc -l) launch/config file(s), package data"

# The launch file starts fusion_attn.launcher's graph: with the install tree's ament index, every
# executable it names must be in lib/fusion_attn and its parameter file under the installed share/.
echo "colcon-check: launch graph -> installed executables and parameter files"
if ! AMENT_PREFIX_PATH="$install" PYTHONPATH="$install/$site${PYTHONPATH:+:$PYTHONPATH}" "$venv/bin/python" - "$install" <<'PY'
import sys
from pathlib import Path
from fusion_attn.launcher import fusion_graph
install = Path(sys.argv[1]).resolve()
for spec in fusion_graph({}):
    exe, params = install / "lib" / spec.package / spec.executable, Path(spec.params_file).resolve()
    assert exe.is_file(), f"launch names executable {spec.executable}, not installed at {exe}"
    assert install in params.parents and params.is_file(), f"launch uses {params}, not the installed share/"
    print(f"  {spec.name}: {exe.relative_to(install)} --params-file {params.relative_to(install)}")
PY
then
    echo "colcon-check: FAILED: the launch graph names something colcon did not install" >&2
    exit 1
fi
echo "colcon-check: OK"
