/*
 * pqcount: a QEMU TCG plugin counting the guest instructions a process executes, with marks.
 *
 * Every translated block adds its instruction count to one counter when it executes (an
 * inline add, no callback: the emulation slows down little). When the guest makes the marker
 * system call, lseek(-1, PQCOUNT_MAGIC, SEEK_SET) (which fails harmlessly with EBADF), the
 * counter's value at that point is recorded. At exit the plugin prints one "mark: N" line per
 * marker, in order, then "insns: N" (the whole process).
 *
 * pqcompile.targets.insn_count runs one process that marks before and after each inference
 * and takes differences of the marks: the count of an inference is exact and does not depend
 * on what the process did before it (start-up work differs between processes by up to 10^7
 * instructions with the command line and paths, so a difference of two processes' totals
 * does not give it).
 *
 * The counter is not atomic: count single-threaded guests (the counted processes run one
 * thread). Built by scripts/build_insn_plugin.sh against the installed qemu-user's
 * qemu-plugin.h (the plugin API is versioned per QEMU release).
 */
#include <inttypes.h>
#include <stdio.h>

#include <glib.h>

#include "qemu-plugin.h"

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#define PQCOUNT_MAGIC UINT64_C(0x5051434d) /* "PQCM" */

static uint64_t insn_count;
static GString *report;

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &insn_count,
                                             qemu_plugin_tb_n_insns(tb));
}

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, uint64_t a1,
                       uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6,
                       uint64_t a7, uint64_t a8)
{
    if (a1 == UINT64_MAX && a2 == PQCOUNT_MAGIC && a3 == 0) {
        g_string_append_printf(report, "mark: %" PRIu64 "\n", insn_count);
    }
}

static void on_exit_report(qemu_plugin_id_t id, void *data)
{
    g_string_append_printf(report, "insns: %" PRIu64 "\n", insn_count);
    qemu_plugin_outs(report->str);
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv)
{
    report = g_string_new(NULL);
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
    qemu_plugin_register_atexit_cb(id, on_exit_report, NULL);
    return 0;
}
