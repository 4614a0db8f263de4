# Sourced by scripts/test.sh. The LlamaBoard browser tests (tests/integrations/test_llamaboard.py) need Debian's
# chromium + chromium-driver; a pip package cannot bring a browser here. Installed with apt when we are root; otherwise
# the reason is passed on in LLAMAFACTORY_MOE_NO_BROWSER and those tests skip naming it.
if ! command -v chromium >/dev/null || [ ! -x /usr/bin/chromedriver ]; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
                >"${TMPDIR:-/tmp}/llamafactory-moe-apt.log" 2>&1; then
            export LLAMAFACTORY_MOE_NO_BROWSER="apt-get could not install chromium chromium-driver (apt unreachable?): $(tail -n 1 "${TMPDIR:-/tmp}/llamafactory-moe-apt.log")"
        fi
    else
        export LLAMAFACTORY_MOE_NO_BROWSER="chromium chromium-driver are missing and cannot be installed here (needs apt-get and root)"
    fi
    echo "browser for the LlamaBoard tests: ${LLAMAFACTORY_MOE_NO_BROWSER:-chromium $(chromium --version 2>/dev/null | cut -d' ' -f2)}"
fi
