/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* What the CLI prints: sizes, rates, times, "label: value" fields, and JSON. */

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "util.h"

const char *yes_no(bool b);
char *format_timespan(char *buf, size_t len, usec_t t);
char *format_timestamp(char *buf, size_t len, usec_t t);
/* A latency: "850us", "1.2ms", "3.5s". */
char *format_latency(char *buf, size_t len, uint64_t usec);
/* "1.5 GiB/s", or zero (e.g. "unlimited") for 0 when zero is not NULL. */
char *format_rate(char *buf, size_t len, uint64_t bytes_per_second, const char *zero);
unsigned percent(uint64_t done, uint64_t total);
bool colors_enabled(void);
bool utf8_enabled(void);
unsigned terminal_columns(int fd);

#define FIELD_WIDTH 14

/* "      Label: value" */
_printf_(2, 3) void print_field(const char *label, const char *format, ...);
void print_field_lines(const char *label, const char *text);
/* s as it is, but for its control characters, written as \xNN (a daemon's string on a terminal). */
void print_escaped(const char *s);

/* JSON output, written by hand: the CLI needs only to emit it. */
typedef struct JsonWriter {
        FILE *f;
        unsigned depth;
        bool need_comma;
        bool after_key;
} JsonWriter;

void json_open(JsonWriter *w, char c);
void json_close(JsonWriter *w, char c);
void json_key(JsonWriter *w, const char *key);
void json_string(JsonWriter *w, const char *s);
void json_unsigned(JsonWriter *w, uint64_t u);
void json_bool(JsonWriter *w, bool b);
void json_strv(JsonWriter *w, char *const *l);
