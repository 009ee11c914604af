#!/usr/bin/env bash
# `make test` runs this first: tests/test_browser.py opens the HTML report in a real headless browser.
# chromium present: nothing to do. Missing, and we are root with apt-get (Debian/Ubuntu, CI containers):
# install Debian's chromium. Otherwise stop with the command to run (or the opt-out).
set -u
for exe in chromium chromium-browser google-chrome; do
  if command -v "$exe" >/dev/null 2>&1; then exit 0; fi
done
if [ "${LNFREE_ALLOW_NO_BROWSER:-}" = "1" ]; then
  echo "make test: chromium missing; LNFREE_ALLOW_NO_BROWSER=1, so tests/test_browser.py will be skipped"
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "make test: installing Debian's chromium for tests/test_browser.py (apt-get; log: /tmp/lnfree-chromium.log)"
  if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
      >/tmp/lnfree-chromium.log 2>&1 && command -v chromium >/dev/null 2>&1; then
    exit 0
  fi
  echo "make test: error: apt-get could not install chromium (see /tmp/lnfree-chromium.log)" >&2
  exit 1
fi
cat >&2 <<'MSG'
make test: error: chromium is not installed, and tests/test_browser.py needs it (the HTML report is
opened in a real headless browser). Install it, then rerun `make test`:
    sudo apt-get install -y chromium        # Debian / Ubuntu
or skip that one test: LNFREE_ALLOW_NO_BROWSER=1 make test
MSG
exit 1
