# Sourced by the GPU scripts: install_wheels LOG installs the carried wheels (.whl/*.whl, pure
# Python or cp312, --no-deps so the image's torch and triton stay) into /tmp/site once per wheel set
# (a warm device machine keeps /tmp between calls, maybe with an older set) and puts /tmp/site on
# PYTHONPATH and PATH. Status 1 when there are no wheels or pip fails (pip's output is in LOG).
install_wheels() {
  local log=$1 set
  compgen -G ".whl/*.whl" > /dev/null || { echo "no .whl/*.whl" > "$log"; return 1; }
  set=$(ls -l .whl | sha256sum | cut -c1-16)
  if [ "$(cat /tmp/site/.clsgen_wheels 2>/dev/null)" != "$set" ]; then
    rm -rf /tmp/site
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > "$log" 2>&1 || return 1
    echo "$set" > /tmp/site/.clsgen_wheels
  fi
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$PATH"
}
