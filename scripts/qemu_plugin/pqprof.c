/*
 * pqprof: pqcount (pqcount.c) plus a profile: how many times each translated block executed
 * between the last two marks, and where the guest mapped executable code.
 *
 * It prints the same "mark: N" and "insns: N" lines as pqcount, so
 * pqcompile.targets.insn_count runs it unchanged (PQCOMPILE_INSN_PLUGIN=libpqprof.so). Where
 * the environment names a file in PQCOUNT_PROFILE (pqcompile's emulator forwards it into the
 * qemu process), it writes there at exit:
 *   "map ADDR LEN PROT" for each mmap with PROT_EXEC the guest made (its guest address), then
 *   "tb PC NINSNS COUNT" for each block executed between the last two marks (a block
 *   translated twice appears twice).
 * benchmarks/aarch64_profile.py builds it, runs it and maps the blocks to the library's
 * kernels. One guest thread (the counters are not atomic), as for pqcount.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include <glib.h>

#include "qemu-plugin.h"

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#define PQCOUNT_MAGIC UINT64_C(0x5051434d) /* "PQCM" */
#define AARCH64_MMAP 222
#define PROT_EXEC_BIT 4

typedef struct {
    uint64_t pc, n, count, prev, last;
} Block;

static uint64_t insn_count;
static GString *report, *maps;
static GPtrArray *blocks;
static uint64_t call_args[3];
static int64_t call_num;

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    Block *b = g_new0(Block, 1);
    b->pc = qemu_plugin_tb_vaddr(tb);
    b->n = qemu_plugin_tb_n_insns(tb);
    g_ptr_array_add(blocks, b);
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &insn_count, b->n);
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &b->count, 1);
}

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, uint64_t a1,
                       uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6,
                       uint64_t a7, uint64_t a8)
{
    call_num = num;
    call_args[0] = a1;
    call_args[1] = a2;
    call_args[2] = a3;
    if (a1 == UINT64_MAX && a2 == PQCOUNT_MAGIC && a3 == 0) {
        g_string_append_printf(report, "mark: %" PRIu64 "\n", insn_count);
        for (guint i = 0; i < blocks->len; i++) {
            Block *b = g_ptr_array_index(blocks, i);
            b->prev = b->last;
            b->last = b->count;
        }
    }
}

static void on_syscall_ret(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, int64_t ret)
{
    if (num == AARCH64_MMAP && call_num == num && (call_args[2] & PROT_EXEC_BIT) && ret > 0) {
        g_string_append_printf(maps, "map %" PRIx64 " %" PRIx64 " %" PRIu64 "\n",
                               (uint64_t)ret, call_args[1], call_args[2]);
    }
}

static void on_exit_report(qemu_plugin_id_t id, void *data)
{
    const char *path = getenv("PQCOUNT_PROFILE");
    FILE *f = path ? fopen(path, "w") : NULL;
    if (f) {
        fputs(maps->str, f);
        for (guint i = 0; i < blocks->len; i++) {
            Block *b = g_ptr_array_index(blocks, i);
            if (b->last > b->prev) {
                fprintf(f, "tb %" PRIx64 " %" PRIu64 " %" PRIu64 "\n", b->pc, b->n,
                        b->last - b->prev);
            }
        }
        fclose(f);
    }
    g_string_append_printf(report, "insns: %" PRIu64 "\n", insn_count);
    qemu_plugin_outs(report->str);
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv)
{
    report = g_string_new(NULL);
    maps = g_string_new(NULL);
    blocks = g_ptr_array_new();
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
    qemu_plugin_register_vcpu_syscall_ret_cb(id, on_syscall_ret);
    qemu_plugin_register_atexit_cb(id, on_exit_report, NULL);
    return 0;
}
