#!/usr/bin/env bash
# Headless rendering (MUJOCO_GL=egl / osmesa) needs EGL and Mesa. Install what is missing when we can
# (root + apt-get); otherwise say what to install. State-based training does not need them.
set -u
missing=()
ldconfig -p 2>/dev/null | grep -q 'libEGL.so.1' || missing+=(libegl1)
ldconfig -p 2>/dev/null | grep -q 'libGL.so.1' || missing+=(libgl1-mesa-dri)
ldconfig -p 2>/dev/null | grep -q 'libOSMesa.so' || missing+=(libosmesa6)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "sparserl: installing rendering libraries: ${missing[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
        || echo "sparserl: warning: could not install ${missing[*]}; pixel rendering may not work"
else
    echo "sparserl: note: pixel rendering needs: ${missing[*]} (e.g. sudo apt-get install -y ${missing[*]})"
fi
exit 0
