/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* blockstreamctl: the command-line client of blockstreamd. It speaks D-Bus only (docs/api.md),
 * so anything it does can also be done with busctl or any other client.
 *
 * This file is main: help, option parsing and dispatch to the verbs (verbs-guest.c,
 * verbs-stream.c, verbs-map.c). Below them: progress.c (following a job), objects.c (the
 * daemon's objects as properties), bus.c (calls and their errors), polkit-agent.c, output.c
 * (fields, JSON) and args.c (the parsed command line). Includes only go down that list. */

#include <getopt.h>
#include <locale.h>

#include "args.h"
#include "blockstream-api.h"
#include "polkit-agent.h"
#include "verbs-guest.h"
#include "verbs-cache.h"
#include "verbs-map.h"
#include "verbs-stream.h"

static const struct {
        unsigned flag;
        const char *name;
} option_names[] = {
        {OPT_OWNER, "--owner="},
        {OPT_UUID, "--uuid="},
        {OPT_DISK, "--disk="},
        {OPT_DISK_NAME, "--disk-name="},
        {OPT_BANDWIDTH, "--bandwidth="},
        {OPT_BASE, "--base="},
        {OPT_ENGINE, "--engine="},
        {OPT_OFFSET, "--offset="},
        {OPT_LENGTH, "--length="},
        {OPT_WAIT, "--wait"},
        {OPT_LISTEN, "--listen="},
        {OPT_TEMPLATE_FORMAT, "--template-format="},
        {OPT_MAX_GUEST_LATENCY, "--max-guest-latency="},
        {OPT_CACHE, "--cache"},
};

/* ---------------------------------------------------------------------------------------- */
/* Help, option parsing, dispatch */

static int help(void) {
        const char *p = program_invocation_short_name;

        printf("%1$s [OPTIONS...] COMMAND [ARGUMENTS...]\n"
               "\n"
               "Control blockstreamd, which streams virtual disks: while a QEMU guest runs, it\n"
               "copies into a thin qcow2 overlay the data the overlay still reads from its\n"
               "backing chain, until the overlay is a standalone disk (like 'virsh blockpull').\n"
               "Every command is a D-Bus call to org.blockstream1 on the system bus.\n"
               "\n"
               "Guest commands:\n"
               "  list                      List the guests and their disks (the default)\n"
               "  status GUEST [DISK]       Show a guest and the state of its disks, or of one\n"
               "                            disk: path, backing chain, size, job state and mode,\n"
               "                            progress, bandwidth, rate, start time, ETA, error,\n"
               "                            guest read p99, speed limit and why\n"
               "  register NAME [QMP_SOCKET]\n"
               "                            Attach a running QEMU by the path of a QMP socket\n"
               "                            reserved for blockstreamd, or a guest that is not\n"
               "                            running (QMP_SOCKET '-' or omitted) with its disks;\n"
               "                            prints the guest's object path\n"
               "        --owner=UID|USER    Owner of the guest (default: you; only root may\n"
               "                            name another user)\n"
               "        --uuid=UUID         The guest's UUID (default: generated)\n"
               "        --disk=ALIAS=PATH   A disk of a guest that is not running, e.g.\n"
               "                            --disk=vda=/var/lib/images/a.qcow2; repeatable\n"
               "        --disk-name=ALIAS=NAME\n"
               "                            Another name for the disk ALIAS, as the guest's\n"
               "                            manager calls it (libvirt's target: vda for\n"
               "                            virtio-disk0); DISK may be it; repeatable\n"
               "  unregister NAME           Detach a guest (refused while a stream runs)\n"
               "\n"
               "Stream commands:\n"
               "  pull GUEST DISK           Start streaming DISK's backing data into its top\n"
               "                            image; it runs in the background\n"
               "        --bandwidth=SIZE[/s]  Limit to SIZE bytes per second (0: unlimited)\n"
               "        --max-guest-latency=TIME\n"
               "                            Follow the guest: keep its read p99 under TIME\n"
               "                            (e.g. 2ms, 500us), full speed while it is idle;\n"
               "                            --bandwidth stays a ceiling. Running guests only\n"
               "        --base=IMAGE        Stream only the images above IMAGE (a path in the\n"
               "                            backing chain or a node name); keep it and below\n"
               "        --engine=ENGINE     How a full stream copies: auto (default), stream\n"
               "                            (QEMU's block-stream) or prefetch (the pull helper\n"
               "                            copies the backing data, then block-stream cuts)\n"
               "                            or mirror (mirror, pivot, rename onto the overlay)\n"
               "        --offset=SIZE       Stream only from this byte offset ...\n"
               "        --length=SIZE       ... for this many bytes (0 or none: to the end);\n"
               "                            a range is widened to whole clusters, and the disk\n"
               "                            keeps its backing chain\n"
               "        --wait              Wait for the end: a progress bar on a terminal,\n"
               "                            then the result. Ctrl-C stops waiting, not the job\n"
               "  wait GUEST DISK           Wait for the running job to end, like pull --wait;\n"
               "                            if none runs, show how the last one ended\n"
               "  pause GUEST DISK          Pause the job\n"
               "  resume GUEST DISK         Resume a paused job\n"
               "  cancel GUEST DISK         Stop the job; what was copied stays copied\n"
               "        --wait              Wait until it has stopped\n"
               "  set-bandwidth GUEST DISK SIZE[/s]\n"
               "                            Change the limit, also of a running job (0 or\n"
               "                            'unlimited': no limit)\n"
               "  set-latency GUEST DISK TIME\n"
               "                            Switch the job to (TIME, e.g. 2ms) or from (0 or\n"
               "                            'off') the guest-latency mode; with no job, the\n"
               "                            default for the next one\n"
               "  map GUEST DISK            Show where DISK's data lies: each extent's offset,\n"
               "                            length, depth (1 = top image, N = Nth image down\n"
               "                            the chain, 0 = none) and kind: local (in the top\n"
               "                            image), zero (zeros in the top image), backing (in\n"
               "                            a backing image), absent (nowhere: reads as zeros).\n"
               "                            On a terminal also a bar of the range, coloured by\n"
               "                            kind, and the share of each kind\n"
               "        --offset=SIZE       Start at this byte offset (default: 0)\n"
               "        --length=SIZE       Cover this many bytes (default: to the end)\n"
               "\n"
               "Disk commands:\n"
               "  export GUEST DISK         Serve DISK read-only over NBD; prints the URI\n"
               "        --listen=unix|tcp:ADDR:PORT\n"
               "                            Where to listen (default: unix)\n"
               "  export-stop EXPORT        Stop an export, by the ID or the object path that\n"
               "                            'export' reported\n"
               "  provision TEMPLATE TARGET\n"
               "                            Create the qcow2 overlay TARGET (in an image\n"
               "                            directory of blockstreamd) backed by TEMPLATE (a\n"
               "                            path, nbd://, nbd+unix://, http(s)://); prints its\n"
               "                            virtual size\n"
               "        --template-format=FMT\n"
               "                            Format of TEMPLATE (default: qcow2 for a path, raw\n"
               "                            for a URL; never probed)\n"
               "        --cache             Make the overlay over the host's cache of a remote\n"
               "                            TEMPLATE (nbd://, http(s)://): read once per host\n"
               "  caches                    List the host's template caches\n"
               "  cache-warm ID             Copy the whole template into cache ID (returns when\n"
               "                            done; the remote may then go away)\n"
               "  cache-stop ID             Stop and remove cache ID (refused while in use)\n"
               "  help                      Show this help\n"
               "\n"
               "Options:\n"
               "  -h --help                 Show this help\n"
               "     --version              Show the version\n"
               "     --json                 Print one JSON document on stdout (see below)\n"
               "  -H --host=[USER@]HOST     Operate on a remote host, over ssh\n"
               "     --no-ask-password      Never ask for a password to authorize an action: no\n"
               "                            polkit agent; an action that needs one fails\n"
               "  -q --quiet                Print only results and errors\n"
               "\n"
               "Options go anywhere on the line; '--' ends them.\n"
               "\n"
               "Authorization:\n"
               "  root may do everything. For anyone else blockstreamd asks polkit, per action:\n"
               "    org.blockstream1.manage   register, unregister, provision, cache-warm,\n"
               "                              cache-stop\n"
               "    org.blockstream1.stream   pull, pause, resume, cancel, set-bandwidth,\n"
               "                              set-latency\n"
               "    org.blockstream1.inspect  map\n"
               "    org.blockstream1.export   export, export-stop\n"
               "  list, status and wait only read, which everyone may.\n"
               "  On a terminal (standard input), a command that needs an action lets polkit\n"
               "  ask for a password: its call allows interactive authorization, and polkit's\n"
               "  text agent " POLKIT_AGENT_PATH " runs while the call lasts (not with --host:\n"
               "  an agent here cannot answer for another host; not as root; not if it is not\n"
               "  installed). --no-ask-password, or no terminal, turns both off: an action\n"
               "  that needs a password then fails with \"Authentication is required\". An\n"
               "  administrator can grant actions with polkit rules (the shipped\n"
               "  50-blockstream.rules lets group \"blockstream\" and a guest's owner stream\n"
               "  and inspect).\n"
               "\n"
               "GUEST is a guest's name: 1 to 64 characters of A-Z a-z 0-9 _ . -\n"
               "DISK is a disk's device alias (vda: QEMU's qdev id), the name given to it at\n"
               "registration (--disk-name=, the Target shown by status) or its top image's\n"
               "path, looked up in that order.\n"
               "Relative paths are made absolute here, except with --host.\n"
               "\n"
               "SIZE is a number of bytes with an optional suffix: K, M, G, T, P, E, their\n"
               "forms Ki, Mi, ... and KiB, MiB, ... are powers of 1024; KB, MB, GB, TB, PB, EB\n"
               "are powers of 1000; B or none means bytes. A suffix allows a fraction: 1.5G.\n"
               "A bandwidth may end in \"/s\": 100MiB/s.\n"
               "TIME is a number with us, ms or s (none: us); a fraction is allowed: 1.5ms.\n"
               "\n"
               "JSON output uses the D-Bus names: properties under theirs (numbers as numbers,\n"
               "sizes in bytes, rates in bytes/s, times in microseconds since the epoch, 0 for\n"
               "unknown), method results under their argument names.\n"
               "  list                      [guest, ...]: each guest's properties and\n"
               "                            \"ObjectPath\", its \"Disks\" expanded to the disks'\n"
               "                            properties, each with its \"ObjectPath\"\n"
               "  status                    one such guest (with DISK: with that disk only)\n"
               "  map                       [{\"offset\", \"length\", \"depth\", \"kind\"}, ...]\n"
               "  register, export, provision  {\"guest\"}, {\"export\", \"uri\"}, {\"size\"}\n"
               "  pull --wait, wait, cancel --wait  {\"result\", \"bytes_done\", \"error\"}\n"
               "\n"
               "Exit status:\n"
               "  0    Success. pull --wait, wait: the job completed (wait: or none ever ran);\n"
               "       cancel --wait: the job stopped (or completed before it could be stopped)\n"
               "  1    The operation failed, or the job failed or was cancelled; the reason is\n"
               "       printed on stderr\n"
               "  2    Wrong usage: unknown command or option, wrong number of arguments, bad\n"
               "       guest name, size or other argument\n"
               "  130  Interrupted while waiting (Ctrl-C); the job goes on\n"
               "\n"
               "Environment:\n"
               "  DBUS_SYSTEM_BUS_ADDRESS   The system bus to use (default: the standard one)\n"
               "  NO_COLOR                  Draw the map bar with letters instead of colours\n"
               "\n"
               "Examples:\n"
               "  %1$s register web1 /run/qemu/web1.qmp\n"
               "  %1$s register golden - --disk=vda=/var/lib/images/golden.qcow2\n"
               "  %1$s register vm1 /run/vm1/qmp.sock --disk-name=virtio-disk0=vda\n"
               "  %1$s pull web1 vda --bandwidth=200M/s --wait\n"
               "  %1$s pull web1 /var/lib/images/web1.qcow2 --offset=1G --length=512M\n"
               "  %1$s set-bandwidth web1 vda 0\n"
               "  %1$s pull web1 vda --max-guest-latency=2ms --wait\n"
               "  %1$s status web1 vda --json\n"
               "  %1$s map web1 vda --length=10G\n"
               "  %1$s export web1 vda --listen=tcp:127.0.0.1:10809\n"
               "  %1$s provision /var/lib/images/base.qcow2 /var/lib/images/web2.qcow2\n"
               "\n"
               "See the org.blockstream1 D-Bus interfaces (org.blockstream1.*.xml) for details.\n",
                p);
        return 0;
}

typedef struct Verb {
        const char *name;
        unsigned min_args, max_args;
        unsigned options; /* OPT_* that apply */
        int (*run)(char **args);
} Verb;

static const Verb verbs[] = {
        {"list", 0, 0, 0, verb_list},
        {"status", 1, 2, 0, verb_status},
        {"register", 1, 2, OPT_OWNER | OPT_UUID | OPT_DISK | OPT_DISK_NAME, verb_register},
        {"unregister", 1, 1, 0, verb_unregister},
        {"pull", 2, 2, OPT_BANDWIDTH | OPT_BASE | OPT_ENGINE | OPT_OFFSET | OPT_LENGTH | OPT_WAIT | OPT_MAX_GUEST_LATENCY,
                verb_pull},
        {"wait", 2, 2, 0, verb_wait},
        {"pause", 2, 2, 0, verb_pause},
        {"resume", 2, 2, 0, verb_resume},
        {"cancel", 2, 2, OPT_WAIT, verb_cancel},
        {"set-bandwidth", 3, 3, 0, verb_set_bandwidth},
        {"set-latency", 3, 3, 0, verb_set_latency},
        {"map", 2, 2, OPT_OFFSET | OPT_LENGTH, verb_map},
        {"export", 2, 2, OPT_LISTEN, verb_export},
        {"export-stop", 1, 1, 0, verb_export_stop},
        {"provision", 2, 2, OPT_TEMPLATE_FORMAT | OPT_CACHE, verb_provision},
        {"caches", 0, 0, 0, verb_caches},
        {"cache-warm", 1, 1, 0, verb_cache_warm},
        {"cache-stop", 1, 1, 0, verb_cache_stop},
};

static int parse_size_arg(const char *option, const char *s, uint64_t *ret) {
        int r = parse_size(s, ret);

        if (r == -ERANGE)
                return log_error_errno(EINVAL, "Size too large for %s: '%s'.", option, s);
        if (r < 0)
                return log_error_errno(
                        EINVAL, "Invalid size for %s: '%s' (expected e.g. 4096, 512K, 1.5G, 10GB).", option, s);
        return 0;
}

/* Returns 1 to go on, 0 to exit successfully, -EINVAL for a usage error (logged). */
static int parse_argv(int argc, char *argv[]) {
        enum {
                ARG_VERSION = 0x100,
                ARG_JSON,
                ARG_NO_ASK_PASSWORD,
                ARG_OWNER,
                ARG_UUID,
                ARG_DISK,
                ARG_DISK_NAME,
                ARG_BANDWIDTH,
                ARG_BASE,
                ARG_ENGINE,
                ARG_OFFSET,
                ARG_LENGTH,
                ARG_WAIT,
                ARG_LISTEN,
                ARG_TEMPLATE_FORMAT,
                ARG_MAX_GUEST_LATENCY,
                ARG_CACHE,
        };
        static const struct option options[] = {{"help", no_argument, NULL, 'h'},
                {"version", no_argument, NULL, ARG_VERSION}, {"json", no_argument, NULL, ARG_JSON},
                {"host", required_argument, NULL, 'H'}, {"no-ask-password", no_argument, NULL, ARG_NO_ASK_PASSWORD},
                {"quiet", no_argument, NULL, 'q'}, {"owner", required_argument, NULL, ARG_OWNER},
                {"uuid", required_argument, NULL, ARG_UUID}, {"disk", required_argument, NULL, ARG_DISK},
                {"disk-name", required_argument, NULL, ARG_DISK_NAME},
                {"bandwidth", required_argument, NULL, ARG_BANDWIDTH}, {"base", required_argument, NULL, ARG_BASE},
                {"engine", required_argument, NULL, ARG_ENGINE}, {"offset", required_argument, NULL, ARG_OFFSET},
                {"length", required_argument, NULL, ARG_LENGTH}, {"wait", no_argument, NULL, ARG_WAIT},
                {"listen", required_argument, NULL, ARG_LISTEN},
                {"template-format", required_argument, NULL, ARG_TEMPLATE_FORMAT},
                {"max-guest-latency", required_argument, NULL, ARG_MAX_GUEST_LATENCY}, {"cache", no_argument, NULL, ARG_CACHE},
                {}};
        int c, r;

        /* Our own messages, not getopt's, so that they all look alike. */
        opterr = 0;
        while ((c = getopt_long(argc, argv, ":hH:q", options, NULL)) >= 0)
                switch (c) {
                case 'h':
                        return help();
                case ARG_VERSION:
                        printf("blockstreamctl %s\n", VERSION);
                        return 0;
                case ARG_JSON:
                        arg_json = true;
                        break;
                case 'H':
                        if (isempty(optarg))
                                return log_error_errno(EINVAL, "--host= needs a host name.");
                        arg_host = optarg;
                        break;
                case ARG_NO_ASK_PASSWORD:
                        arg_ask_password = false;
                        break;
                case 'q':
                        arg_quiet = true;
                        break;
                case ARG_OWNER:
                        if (isempty(optarg))
                                return log_error_errno(EINVAL, "--owner= needs a uid or user name.");
                        arg_owner = optarg;
                        arg_given |= OPT_OWNER;
                        break;
                case ARG_UUID:
                        arg_uuid = optarg;
                        arg_given |= OPT_UUID;
                        break;
                case ARG_DISK: {
                        const char *eq = strchr(optarg, '=');
                        size_t l = eq ? (size_t) (eq - optarg) : 0;

                        if (!eq || l == 0 || isempty(eq + 1))
                                return log_error_errno(EINVAL, "Invalid --disk='%s': expected ALIAS=PATH.", optarg);
                        for (char **d = arg_disks; d && *d; d++)
                                if (strncmp(*d, optarg, l + 1) == 0)
                                        return log_error_errno(EINVAL, "Disk '%.*s' given twice.", (int) l, optarg);
                        r = strv_push(&arg_disks, strdup(optarg));
                        if (r < 0)
                                return log_oom();
                        arg_given |= OPT_DISK;
                        break;
                }
                case ARG_DISK_NAME: {
                        const char *eq = strchr(optarg, '=');
                        size_t l = eq ? (size_t) (eq - optarg) : 0;

                        /* The daemon checks the names; this only splits them. */
                        if (!eq || l == 0 || isempty(eq + 1))
                                return log_error_errno(EINVAL, "Invalid --disk-name='%s': expected ALIAS=NAME.", optarg);
                        for (char **d = arg_disk_names; d && *d; d++)
                                if (strncmp(*d, optarg, l + 1) == 0)
                                        return log_error_errno(EINVAL, "Disk '%.*s' named twice.", (int) l, optarg);
                        r = strv_push(&arg_disk_names, strdup(optarg));
                        if (r < 0)
                                return log_oom();
                        arg_given |= OPT_DISK_NAME;
                        break;
                }
                case ARG_BANDWIDTH:
                        if (parse_bandwidth(optarg, &arg_bandwidth) < 0)
                                return log_error_errno(EINVAL,
                                        "Invalid size for --bandwidth=: '%s' (expected e.g. "
                                        "100M, 1.5GiB/s, 0 for unlimited).",
                                        optarg);
                        arg_given |= OPT_BANDWIDTH;
                        break;
                case ARG_MAX_GUEST_LATENCY:
                        if (parse_latency(optarg, &arg_max_guest_latency) < 0)
                                return log_error_errno(EINVAL,
                                        "Invalid time for --max-guest-latency=: '%s' (expected e.g. 2ms, 500us, "
                                        "0.5s, or 0 for off).",
                                        optarg);
                        arg_given |= OPT_MAX_GUEST_LATENCY;
                        break;
                case ARG_BASE:
                        if (isempty(optarg))
                                return log_error_errno(EINVAL, "--base= needs an image path or node name.");
                        arg_base = optarg;
                        arg_given |= OPT_BASE;
                        break;
                case ARG_ENGINE:
                        if (!streq(optarg, BS_ENGINE_AUTO) && !streq(optarg, BS_ENGINE_STREAM) &&
                                !streq(optarg, BS_ENGINE_PREFETCH) && !streq(optarg, BS_ENGINE_MIRROR))
                                return log_error_errno(EINVAL,
                                        "Invalid --engine='%s' (expected auto, stream, prefetch or mirror).", optarg);
                        arg_engine = optarg;
                        arg_given |= OPT_ENGINE;
                        break;
                case ARG_OFFSET:
                        if (parse_size_arg("--offset=", optarg, &arg_offset) < 0)
                                return -EINVAL;
                        arg_given |= OPT_OFFSET;
                        break;
                case ARG_LENGTH:
                        if (parse_size_arg("--length=", optarg, &arg_length) < 0)
                                return -EINVAL;
                        arg_given |= OPT_LENGTH;
                        break;
                case ARG_WAIT:
                        arg_wait = true;
                        arg_given |= OPT_WAIT;
                        break;
                case ARG_LISTEN:
                        arg_listen = optarg;
                        arg_given |= OPT_LISTEN;
                        break;
                case ARG_TEMPLATE_FORMAT:
                        if (isempty(optarg))
                                return log_error_errno(EINVAL, "--template-format= needs a format name.");
                        arg_template_format = optarg;
                        arg_given |= OPT_TEMPLATE_FORMAT;
                        break;
                case ARG_CACHE:
                        arg_cache = true;
                        arg_given |= OPT_CACHE;
                        break;
                case ':':
                        return log_error_errno(EINVAL, "Option '%s' needs an argument.", argv[optind - 1]);
                case '?':
                        if (optopt > 0 && optopt < 0x100)
                                return log_error_errno(EINVAL, "Unknown option '-%c'. See --help.", optopt);
                        return log_error_errno(EINVAL, "Unknown option '%s'. See --help.", argv[optind - 1]);
                default:
                        return log_error_errno(EINVAL, "Unhandled option %d.", c);
                }
        return 1;
}

static int dispatch_verb(int argc, char **argv) {
        const char *name = argc > 0 ? argv[0] : "list";
        const Verb *v = NULL;
        unsigned n_args = argc > 0 ? (unsigned) argc - 1 : 0;

        if (streq(name, "help"))
                return help();
        for (size_t i = 0; i < ELEMENTSOF(verbs); i++)
                if (streq(verbs[i].name, name)) {
                        v = &verbs[i];
                        break;
                }
        if (!v)
                return usage_error("Unknown command '%s'. See --help.", name);
        if (n_args < v->min_args)
                return usage_error("Too few arguments for '%s'. See --help.", name);
        if (n_args > v->max_args)
                return usage_error("Too many arguments for '%s'. See --help.", name);
        for (size_t i = 0; i < ELEMENTSOF(option_names); i++)
                if ((arg_given & option_names[i].flag) && !(v->options & option_names[i].flag))
                        return usage_error("Option %s does not apply to '%s'. See --help.", option_names[i].name, name);

        return v->run(argc > 0 ? argv + 1 : argv + argc);
}

int main(int argc, char *argv[]) {
        int r;

        log_setup("blockstreamctl");
        /* Only the character set, for the progress bar's blocks; numbers stay in the C locale
         * so that "1.5 GiB" reads the same everywhere. */
        (void) setlocale(LC_CTYPE, "");

        r = parse_argv(argc, argv);
        if (r > 0)
                r = dispatch_verb(argc - optind, argv + optind);
        else if (r < 0)
                r = EXIT_USAGE;
        arg_disks = strv_free(arg_disks);
        arg_disk_names = strv_free(arg_disk_names);
        polkit_agent_close(); /* in case a verb returned while holding it */

        if (fflush(stdout) != 0 || ferror(stdout)) {
                log_error_errno(errno ?: EIO, "Failed to write to standard output: %m");
                return EXIT_FAILURE;
        }
        return r < 0 ? EXIT_FAILURE : r;
}
