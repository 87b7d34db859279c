#!/usr/bin/env bash
# mypy --strict over the installed layout: drivers/ and simulators/ are the packages linectl.drivers and
# linectl.simulators (setuptools package-dir), a mapping mypy cannot read. A tree of symlinks in build/typecheck
# gives mypy that layout; its report names the files where they are in the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=build/typecheck
rm -rf "$tree" && mkdir -p "$tree/linectl"
for f in linectl/* linectl/.[!.]*; do
  [[ -e "$f" ]] && ln -s "$PWD/$f" "$tree/linectl/$(basename "$f")"
done
ln -s "$PWD/drivers" "$tree/linectl/drivers"
ln -s "$PWD/simulators" "$tree/linectl/simulators"
set +e
MYPYPATH="$tree" .venv/bin/python -m mypy "$@" | sed -e "s#^$tree/linectl/drivers/#drivers/#" -e "s#^$tree/linectl/simulators/#simulators/#" -e "s#^$tree/##"
rc=${PIPESTATUS[0]}
exit "$rc"
