/* SPDX-License-Identifier: LGPL-2.1-or-later */

#include <errno.h>
#include <getopt.h>

#include "helper-common.h"
#include "pull-args.h"
#include "util.h"

static void help(void) {
        printf("%s --pull|--map --export=NAME --offset=BYTES --length=BYTES [OPTIONS]\n\n"
               "Makes QEMU's NBD server copy the parts of a range that are still in a backing image\n"
               "into the top image (--pull): NBD_CMD_CACHE on an export of the top node, which QEMU\n"
               "serves with its copy-on-read, or reads through a copy-on-read filter (--no-cache).\n"
               "Or reports the range's allocation map (--map). Talks NBD on fd 3 and to blockstreamd\n"
               "on fd 4. Started by blockstreamd only.\n\n"
               "  -h --help               Show this help\n"
               "     --version            Show the version\n"
               "     --pull               Read the parts of the range still in a backing image\n"
               "     --map                Report extents: offset, length, depth, kind\n"
               "     --export=NAME        NBD export name\n"
               "     --offset=BYTES       Start of the range\n"
               "     --length=BYTES       Length of the range\n"
               "     --bandwidth=BYTES    Bytes per second, 0 for no limit (--pull; default 0)\n"
               "     --chunk=BYTES        Largest read, 4 KiB to 32 MiB (--pull; default 128 KiB).\n"
               "                          Above 128 KiB, one CACHE is 16 MiB (the first with that\n"
               "                          much to copy in one piece and no bandwidth limit), and\n"
               "                          fewer than 32 MiB / chunk go in flight: QEMU's bounce\n"
               "                          buffers then stay in its heap\n"
               "     --parallel=N         Reads in flight, 1 to 64 (--pull; default 64)\n"
               "     --no-cache           Read the data instead of NBD_CMD_CACHE (--pull; for an\n"
               "                          export of a copy-on-read filter, where a CACHE copies twice)\n"
               "     --max-extents=N      Stop after N extents (--map; default 65536)\n",
                program_invocation_short_name);
}

int parse_argv(int argc, char *argv[], Args *args) {
        enum {
                ARG_VERSION = 0x100,
                ARG_PULL,
                ARG_MAP,
                ARG_EXPORT,
                ARG_OFFSET,
                ARG_LENGTH,
                ARG_BANDWIDTH,
                ARG_CHUNK,
                ARG_PARALLEL,
                ARG_MAX_EXTENTS,
                ARG_NO_CACHE,
        };
        static const struct option options[] = {
                { "help", no_argument, NULL, 'h' },
                { "version", no_argument, NULL, ARG_VERSION },
                { "pull", no_argument, NULL, ARG_PULL },
                { "map", no_argument, NULL, ARG_MAP },
                { "export", required_argument, NULL, ARG_EXPORT },
                { "offset", required_argument, NULL, ARG_OFFSET },
                { "length", required_argument, NULL, ARG_LENGTH },
                { "bandwidth", required_argument, NULL, ARG_BANDWIDTH },
                { "chunk", required_argument, NULL, ARG_CHUNK },
                { "parallel", required_argument, NULL, ARG_PARALLEL },
                { "max-extents", required_argument, NULL, ARG_MAX_EXTENTS },
                { "no-cache", no_argument, NULL, ARG_NO_CACHE },
                {},
        };
        uint64_t end;
        int c, r;

        *args = (Args) {
                .chunk = CHUNK_DEFAULT,
                .parallel = PARALLEL_DEFAULT,
                .max_extents = MAX_EXTENTS_DEFAULT,
        };

        opterr = 0;
        while ((c = getopt_long(argc, argv, "h", options, NULL)) >= 0) {
                uint64_t *v = NULL;
                const char *name = NULL;

                switch (c) {
                case 'h':
                        help();
                        return 0;
                case ARG_VERSION:
                        printf("blockstream-pull %s\n", VERSION);
                        return 0;
                case ARG_PULL:
                case ARG_MAP:
                        if (args->mode != MODE_NONE)
                                return helper_fail(EINVAL, "Only one of --pull and --map may be given.");
                        args->mode = c == ARG_PULL ? MODE_PULL : MODE_MAP;
                        break;
                case ARG_EXPORT:
                        args->export_name = optarg;
                        break;
                case ARG_OFFSET:
                        v = &args->offset, name = "--offset";
                        args->have_offset = true;
                        break;
                case ARG_LENGTH:
                        v = &args->length, name = "--length";
                        args->have_length = true;
                        break;
                case ARG_BANDWIDTH:
                        v = &args->bandwidth, name = "--bandwidth";
                        break;
                case ARG_CHUNK:
                        v = &args->chunk, name = "--chunk";
                        break;
                case ARG_PARALLEL:
                        v = &args->parallel, name = "--parallel";
                        break;
                case ARG_MAX_EXTENTS:
                        v = &args->max_extents, name = "--max-extents";
                        break;
                case ARG_NO_CACHE:
                        args->no_cache = true;
                        break;
                case '?':
                        if (optopt != 0)
                                return helper_fail(EINVAL, "Option %s needs an argument or takes none.",
                                        argv[optind - 1]);
                        return helper_fail(EINVAL, "Unknown option %s.", argv[optind - 1]);
                default:
                        return helper_fail(EINVAL, "Unknown option.");
                }
                if (v) {
                        r = parse_size(optarg, v);
                        if (r < 0)
                                return helper_fail(r, "Invalid value for %s: %s", name, optarg);
                }
        }
        if (optind < argc)
                return helper_fail(EINVAL, "This program takes no positional arguments (see --help).");

        if (args->mode == MODE_NONE)
                return helper_fail(EINVAL, "One of --pull and --map is needed.");
        /* "" is allowed: NBD's default export. */
        if (!args->export_name || strlen(args->export_name) > NBD_NAME_MAX)
                return helper_fail(EINVAL, "--export needs a name of at most %d bytes.", NBD_NAME_MAX);
        if (!args->have_offset || !args->have_length)
                return helper_fail(EINVAL, "--offset and --length are needed.");
        if (add_overflows_u64(args->offset, args->length, &end) || end > INT64_MAX)
                return helper_fail(ERANGE, "--offset plus --length is too large.");
        if (args->chunk < CHUNK_MIN || args->chunk > CHUNK_MAX)
                return helper_fail(ERANGE, "--chunk must be between %" PRIu64 " and %" PRIu64 " bytes.", CHUNK_MIN,
                        CHUNK_MAX);
        if (args->parallel < 1 || args->parallel > PARALLEL_MAX)
                return helper_fail(ERANGE, "--parallel must be between 1 and %d.", PARALLEL_MAX);
        if (args->max_extents < 1)
                return helper_fail(ERANGE, "--max-extents must be at least 1.");
        return 1;
}

