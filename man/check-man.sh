#!/bin/sh
# SPDX-License-Identifier: LGPL-2.1-or-later
# Each man page given must render with groff's man macros with no warning at all (-ww), and
# through man -l, to a page that carries its NAME section.
set -u
status=0
for page in "$@"; do
        warnings=$(groff -man -Tutf8 -ww -z "$page" 2>&1)
        if [ -n "$warnings" ]; then
                echo "FAIL: $page: groff warns:"
                echo "$warnings"
                status=1
                continue
        fi
        # man-db's own path (preprocessors, its groff call); --warnings passes -ww to groff.
        errs=$(MANWIDTH=80 man --warnings=w -l "$page" 2>&1 >/dev/null </dev/null)
        out=$(MANWIDTH=80 man -l "$page" 2>/dev/null </dev/null | col -b)
        if [ -n "$errs" ] || ! printf '%s\n' "$out" | grep -q '^NAME$'; then
                printf '%s\n' "$errs"
                echo "FAIL: $page: man -l did not render it:"
                printf '%s\n' "$out" | head -20
                status=1
                continue
        fi
        echo "ok: $page ($(printf '%s\n' "$out" | wc -l) lines)"
done
exit $status
