#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Runs the bash completion of blockstreamctl in bash, as bash would (COMP_WORDS, COMP_CWORD,
# the completion function), with a stand-in busctl on PATH that prints the object tree of
# org.blockstream1 (path-escaped names, as sd-bus makes them) and records its arguments.
set -u
script=${1:?usage: test-completion.sh COMPLETION_SCRIPT}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/busctl" <<'FAKE'
#!/bin/sh
echo "$*" >>"$BUSCTL_ARGS_LOG"
case " $* " in
*" get-property "*)
        # the Targets: vm1's vdb is named "root" by its manager, the others have none
        case " $* " in
        *" /org/blockstream1/guest/vm1/vdb "*) echo 's "root"' ;;
        *) echo 's ""' ;;
        esac
        exit 0 ;;
esac
cat <<TREE
/
/org
/org/blockstream1
/org/blockstream1/export
/org/blockstream1/export/_31
/org/blockstream1/guest
/org/blockstream1/guest/vm1
/org/blockstream1/guest/vm1/vda
/org/blockstream1/guest/vm1/vdb
/org/blockstream1/guest/web_2d2_2eprod
/org/blockstream1/guest/web_2d2_2eprod/sda
TREE
FAKE
chmod +x "$tmp/busctl"
export PATH="$tmp:$PATH" BUSCTL_ARGS_LOG="$tmp/args"
# shellcheck source=/dev/null
. "$script"

failed=0
# complete LINE EXPECTED...: the completions of the last word of LINE (a trailing space: a new
# word), sorted, must be exactly EXPECTED.
complete_line() {
        local line=$1; shift
        read -r -a COMP_WORDS <<<"$line"
        [[ $line == *' ' ]] && COMP_WORDS+=('')
        COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
        COMP_LINE=$line
        COMP_POINT=${#line}
        COMPREPLY=()
        _blockstreamctl blockstreamctl "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
        local got want
        got=$(printf '%s\n' "${COMPREPLY[@]}" | sort | tr '\n' ' ')
        want=$(printf '%s\n' "$@" | sort | tr '\n' ' ')
        if [[ $got != "$want" ]]; then
                echo "FAIL: '$line': got [$got], want [$want]"
                failed=1
        else
                echo "ok: '$line' -> [$got]"
        fi
}

complete_line 'blockstreamctl pa' pause
complete_line 'blockstreamctl se' set-bandwidth set-latency
complete_line 'blockstreamctl export' export export-stop
complete_line 'blockstreamctl pull ' vm1 web-2.prod
complete_line 'blockstreamctl pull w' web-2.prod
complete_line 'blockstreamctl --json status vm1 ' vda vdb root
complete_line 'blockstreamctl pull vm1 r' root
complete_line 'blockstreamctl register vm3 /run/q.sock --disk' --disk= --disk-name=
complete_line 'blockstreamctl pull web-2.prod ' sda
complete_line 'blockstreamctl pull vm1 vda --b' --bandwidth= --base=
complete_line 'blockstreamctl pull vm1 vda --w' --wait
complete_line 'blockstreamctl pull vm1 vda --m' --max-guest-latency=
complete_line 'blockstreamctl set-latency vm1 vda ' off 2ms
complete_line 'blockstreamctl pull vm1 vda --e' --engine=
complete_line 'blockstreamctl pull vm1 vda --engine=p' prefetch
complete_line 'blockstreamctl map vm1 vda --' --help --version --json --host= --no-ask-password --quiet \
        --offset= --length=
complete_line 'blockstreamctl export vm1 vda --listen=t' tcp:
complete_line 'blockstreamctl set-bandwidth vm1 vda ' unlimited 0
complete_line 'blockstreamctl unregister v' vm1
complete_line 'blockstreamctl export-stop ' 1
complete_line 'blockstreamctl export-stop 1 '
complete_line 'blockstreamctl pull vm1 vda ' 
: >"$BUSCTL_ARGS_LOG"
complete_line 'blockstreamctl -H admin@host2 pause ' vm1 web-2.prod
complete_line 'blockstreamctl -H admin@host2 pause vm1 ' vda vdb root
if grep -v -q -- '--host=admin@host2 ' "$BUSCTL_ARGS_LOG"; then
        echo "FAIL: with -H, busctl was asked here: $(cat "$BUSCTL_ARGS_LOG")"
        failed=1
fi
if ! grep -q -- '--host=admin@host2 ' "$BUSCTL_ARGS_LOG"; then
        echo "FAIL: with -H, busctl was not asked on that host: $(cat "$BUSCTL_ARGS_LOG")"
        failed=1
fi
exit $failed
