#!/usr/bin/env bash
# System packages: EGL and Mesa for headless rendering (MUJOCO_GL=egl / osmesa), Slurm for the cluster
# tests, Chromium for the report's browser test. Install what is missing when we can (root + apt-get);
# otherwise say what to install. State-based training needs none of them.
set -u
missing=()
ldconfig -p 2>/dev/null | grep -q 'libEGL.so.1' || missing+=(libegl1)
ldconfig -p 2>/dev/null | grep -q 'libGL.so.1' || missing+=(libgl1-mesa-dri)
ldconfig -p 2>/dev/null | grep -q 'libOSMesa.so' || missing+=(libosmesa6)
# A one-node Slurm for the cluster tests (tests/test_slurm.py starts it with scripts/slurm_up.sh);
# slurmdbd + MariaDB because submitit reads job states through sacct.
for pkg in slurmctld slurmd slurm-client munge slurmdbd mariadb-server; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
# Headless Chromium: tests/test_report_browser.py renders report.html the way a reader sees it.
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "sparserl: installing system packages: ${missing[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null) \
        || echo "sparserl: warning: could not install ${missing[*]}; pixel rendering, the Slurm tests or the browser test may not work"
else
    echo "sparserl: note: pixel rendering, the Slurm tests and the browser test need: ${missing[*]} (e.g. sudo apt-get install -y ${missing[*]})"
fi
exit 0
