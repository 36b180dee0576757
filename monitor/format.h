/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include <glib.h>

/* Sizes as blockstreamctl reads them: a number of bytes with an optional suffix (K M G T P E,
 * Ki.., KiB..: powers of 1024; KB MB ..: powers of 1000; B), a fraction only with a suffix; with
 * allow_rate also a trailing "/s". Surrounding blanks are allowed. Returns FALSE on anything else
 * and on overflow. */
gboolean bs_parse_size(const char *s, gboolean allow_rate, guint64 *ret);

/* "0 B", "512 B", "1.5 KiB", "1.0 GiB". Returns a new string. */
char *bs_format_size(guint64 bytes);

/* "unlimited" for 0, else "100.0 MiB/s". Returns a new string. */
char *bs_format_rate(guint64 bytes_per_second);

/* A CLOCK_REALTIME time in µs as local "HH:MM:SS" (with the date if not today); "" for 0. */
char *bs_format_time(guint64 usec, gint64 now_usec);

/* The text of a disk's progress bar: "done of total · rate · ends at TIME" (parts omitted when
 * unknown). */
char *bs_format_progress(guint64 done, guint64 total, guint64 rate, guint64 end_usec, gint64 now_usec);
/* The last element of an object path, unescaped as sd-bus escapes it. */
char *bs_path_name(const char *path);
