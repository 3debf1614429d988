// SPDX-License-Identifier: MIT OR GPL-2.0
/*
 * thinhv_attack: the attack suite's hostile kernel (issue 11). Loaded in
 * the test guest with `attack=NAME`, it does at CPL 0 what a kernel that
 * wants to get around thinhv would do, prints what it tried and saw as
 * "thinhv_attack: attack NAME: ..." lines; then it is removed (rmmod).
 * Init succeeds whatever happened: a failing init_module makes busybox's
 * insmod try again, and the attack would run twice.
 *
 *   hc-mmio          STATUS hypercalls with the buffer in MMIO (VGA, IOAPIC,
 *                    the local APIC, the q35 ECAM window, the VT-d window);
 *                    control: the same call into a page of RAM.
 *   invd             a hypercall (thinhv writes), then INVD; thinhv's INVD
 *                    exit counters before and after.
 *   ipi-unknown      INIT, SIPI, SIPI to APIC ID 0x7e, which no CPU has
 *                    (thinhv logs the refusals).
 *   ipi-partition    INIT, SIPI, SIPI, NMI and a fixed IPI to `target` (an
 *                    appliance's APIC ID), then an NMI to all but self, a
 *                    logical-destination NMI to every flat ID (0xff), and,
 *                    as the control, an NMI to `control` (an APIC ID of the
 *                    OS's own) that must arrive (its NMI count rises).
 *   apic-reloc-init  moves this CPU's xAPIC with IA32_APIC_BASE and sends
 *                    INIT through the ICR at the new base to `target` (an
 *                    APIC ID whose CPU Linux has taken offline); thinhv's
 *                    INIT exit counter of that CPU before and after.
 *
 * "succeeded" counts what got around thinhv: a buffer in MMIO accepted,
 * an INVD that did not exit, an INIT through the moved ICR that thinhv did
 * not take as an exit.
 */
#include <linux/module.h>
#include <linux/init.h>
#include <linux/io.h>
#include <linux/irqflags.h>
#include <linux/delay.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <asm/msr.h>
#include <asm/processor.h>

/* GPL-compatible for the kernel; MIT like the rest of thinhv. */
MODULE_LICENSE("Dual MIT/GPL");
MODULE_DESCRIPTION("thinhv attack suite: CPL 0 attacks a hostile kernel would try");

static char *attack = "";
module_param(attack, charp, 0);
MODULE_PARM_DESC(attack, "hc-mmio | invd | ipi-unknown | apic-reloc-init");
static int target = 1;
module_param(target, int, 0);
MODULE_PARM_DESC(target, "apic-reloc-init: APIC ID of an offline CPU; ipi-partition: an appliance's");
static int control = 1;
module_param(control, int, 0);
MODULE_PARM_DESC(control, "ipi-partition: APIC ID of one of the OS's own CPUs");

#define PFX "thinhv_attack: "

/* Hypercall ABI (docs/hypercalls.md). */
#define HC_VERSION 0
#define HC_STATUS 1
#define HC_EXIT_COUNTS 4
#define EXIT_INIT 7
#define EXIT_INVD 14
#define EXIT_REASONS 32

static bool intel;

struct hc {
	u64 rax, rbx, rcx, rdx;
};

static void hypercall(struct hc *h)
{
	if (intel)
		asm volatile("vmcall"
			     : "+a"(h->rax), "+b"(h->rbx), "+c"(h->rcx), "+d"(h->rdx)
			     :
			     : "memory");
	else
		asm volatile("vmmcall"
			     : "+a"(h->rax), "+b"(h->rbx), "+c"(h->rcx), "+d"(h->rdx)
			     :
			     : "memory");
}

/* Whether thinhv answers (CPUID 0x40000000 = "ThinHVThinHV"). */
static bool thinhv_present(void)
{
	unsigned int a, b, c, d;
	char sig[13];

	cpuid(0x40000000, &a, &b, &c, &d);
	memcpy(sig, &b, 4);
	memcpy(sig + 4, &c, 4);
	memcpy(sig + 8, &d, 4);
	sig[12] = 0;
	cpuid(0, &a, &b, &c, &d);
	intel = b == 0x756e6547; /* "Genu" */
	return strcmp(sig, "ThinHVThinHV") == 0;
}

static u64 hc_status_into(u64 gpa, u64 len)
{
	struct hc h = { HC_STATUS, gpa, len, 0 };

	hypercall(&h);
	return h.rax;
}

/* Sum of exit counter `reason` over `cpus` CPUs (or of CPU `only`). */
static u64 exit_count(u64 *buf, int reason, int only)
{
	struct hc v = { HC_VERSION, 0, 0, 0 };
	u64 sum = 0;
	int cpu, cpus;

	hypercall(&v);
	cpus = (int)v.rdx;
	for (cpu = 0; cpu < cpus; cpu++) {
		struct hc h = { HC_EXIT_COUNTS, virt_to_phys(buf), PAGE_SIZE, cpu };

		if (only >= 0 && cpu != only)
			continue;
		memset(buf, 0, PAGE_SIZE);
		hypercall(&h);
		if (h.rax == 0)
			sum += buf[reason];
	}
	return sum;
}

static void hc_mmio(void)
{
	static const u64 mmio[] = { 0xa0000, 0xfec00000, 0xfee00000,
				    0xb0000000, 0xfed90000 };
	void *page = (void *)get_zeroed_page(GFP_KERNEL);
	unsigned int i, taken = 0;
	u64 control;

	if (!page) {
		pr_info(PFX "attack hc-mmio: attempts=0 succeeded=0 error=nomem\n");
		return;
	}
	control = hc_status_into(virt_to_phys(page), PAGE_SIZE);
	for (i = 0; i < ARRAY_SIZE(mmio); i++) {
		u64 st = hc_status_into(mmio[i], 256);

		pr_info(PFX "attack hc-mmio-%#llx: status=%llu\n", mmio[i], st);
		if (st == 0)
			taken++;
	}
	pr_info(PFX "attack hc-mmio: attempts=%zu succeeded=%u control_status=%llu\n",
		ARRAY_SIZE(mmio), taken, control);
	free_page((unsigned long)page);
}

static void invd_attack(void)
{
	u64 *buf = (u64 *)get_zeroed_page(GFP_KERNEL);
	unsigned long flags;
	u64 before, after;

	if (!buf) {
		pr_info(PFX "attack invd: attempts=0 succeeded=0 error=nomem\n");
		return;
	}
	before = exit_count(buf, EXIT_INVD, -1);
	local_irq_save(flags);
	/* thinhv writes the status report, then the caches are discarded.
	 * WBINVD first, so that natively (the attack working) the guest
	 * loses as little as possible of its own. */
	hc_status_into(virt_to_phys(buf), PAGE_SIZE);
	asm volatile("wbinvd\n\tinvd" ::: "memory");
	local_irq_restore(flags);
	after = exit_count(buf, EXIT_INVD, -1);
	pr_info(PFX "attack invd: attempts=1 succeeded=%d invd_exits=%llu\n",
		after == before, after - before);
	free_page((unsigned long)buf);
}

#define THV_APIC_BASE_MSR 0x1b
#define APIC_BASE_X2APIC (1ULL << 10)
#define APIC_ICR_LOW 0x300
#define APIC_ICR_HIGH 0x310
#define X2APIC_ICR_MSR 0x830
#define ICR_INIT 0x4500 /* INIT, level assert, physical */
#define ICR_SIPI 0x4600 /* Startup, level assert, physical */
#define ICR_NMI 0x4400 /* NMI, level assert, physical */
#define ICR_BUSY (1 << 12)

static bool x2apic_on(void)
{
	u64 base;

	rdmsrl(THV_APIC_BASE_MSR, base);
	return base & APIC_BASE_X2APIC;
}

/* One IPI through the xAPIC page at `apic` (or the x2APIC ICR). */
static void send_ipi(void __iomem *apic, u32 dest, u32 low)
{
	int spins = 100000;

	if (!apic) {
		wrmsrl(X2APIC_ICR_MSR, ((u64)dest << 32) | low);
		return;
	}
	writel(dest << 24, apic + APIC_ICR_HIGH);
	writel(low, apic + APIC_ICR_LOW);
	while ((readl(apic + APIC_ICR_LOW) & ICR_BUSY) && --spins)
		cpu_relax();
}

/*
 * This CPU's xAPIC page, mapped (NULL in x2APIC mode, where send_ipi uses
 * the MSR); false, with the attack's error line printed, if it cannot be.
 */
static bool map_apic(const char *name, void __iomem **apic)
{
	u64 base;

	*apic = NULL;
	if (x2apic_on())
		return true;
	rdmsrl(THV_APIC_BASE_MSR, base);
	*apic = ioremap(base & ~0xfffULL & ((1ULL << 52) - 1), 0x1000);
	if (!*apic) {
		pr_info(PFX "attack %s: sent=0 error=ioremap\n", name);
		return false;
	}
	return true;
}

static void ipi_unknown(void)
{
	void __iomem *apic;
	unsigned long flags;

	if (!map_apic("ipi-unknown", &apic))
		return;
	local_irq_save(flags);
	send_ipi(apic, 0x7e, ICR_INIT);
	send_ipi(apic, 0x7e, ICR_SIPI | 0x9f);
	send_ipi(apic, 0x7e, ICR_SIPI | 0x9f);
	local_irq_restore(flags);
	if (apic)
		iounmap(apic);
	pr_info(PFX "attack ipi-unknown: sent=3 target=0x7e\n");
}

static void ipi_partition(void)
{
	void __iomem *apic;
	unsigned long flags;

	if (!map_apic("ipi-partition", &apic))
		return;
	local_irq_save(flags);
	send_ipi(apic, target, ICR_INIT);
	send_ipi(apic, target, ICR_SIPI | 0x9f);
	send_ipi(apic, target, ICR_SIPI | 0x9f);
	send_ipi(apic, target, ICR_NMI);
	send_ipi(apic, target, 0xfd);
	/* Shorthand "all excluding self" (bits 18-19 = 3), NMI. */
	send_ipi(apic, 0, ICR_NMI | (3 << 18));
	/* Logical destination mode (bit 11), every flat logical ID. */
	send_ipi(apic, 0xff, ICR_NMI | (1 << 11));
	send_ipi(apic, control, ICR_NMI);
	local_irq_restore(flags);
	if (apic)
		iounmap(apic);
	pr_info(PFX "attack ipi-partition: sent=8 target=%d control=%d\n", target, control);
}

#define RELOC_TO 0xfec80000ULL

static void apic_reloc_init(void)
{
	u64 *buf = (u64 *)get_zeroed_page(GFP_KERNEL);
	void __iomem *moved;
	unsigned long flags;
	u64 base, back, before, after = 0;
	int wrote, i;

	if (!buf)
		return;
	if (x2apic_on()) {
		/* An x2APIC has no MMIO page to move (SDM Vol. 3A 12.12.1). */
		pr_info(PFX "attack apic-reloc-init: attempts=0 succeeded=0 skipped=x2apic\n");
		free_page((unsigned long)buf);
		return;
	}
	moved = ioremap(RELOC_TO, 0x1000);
	if (!moved) {
		pr_info(PFX "attack apic-reloc-init: attempts=0 succeeded=0 error=ioremap\n");
		free_page((unsigned long)buf);
		return;
	}
	before = exit_count(buf, EXIT_INIT, target);
	local_irq_save(flags);
	rdmsrl(THV_APIC_BASE_MSR, base);
	wrote = wrmsrl_safe(THV_APIC_BASE_MSR, (base & 0xfffULL) | RELOC_TO);
	if (wrote == 0) {
		send_ipi(moved, target, ICR_INIT);
		wrmsrl(THV_APIC_BASE_MSR, base);
	}
	rdmsrl(THV_APIC_BASE_MSR, back);
	local_irq_restore(flags);
	iounmap(moved);
	/* The INIT reaches the target asynchronously (thinhv wakes it). */
	for (i = 0; i < 200; i++) {
		after = exit_count(buf, EXIT_INIT, target);
		if (after != before || wrote != 0)
			break;
		msleep(1);
	}
	pr_info(PFX "attack apic-reloc-init: attempts=%d succeeded=%d relocated=%d init_exits=%llu target=%d base_restored=%d\n",
		wrote == 0, wrote == 0 && after == before, wrote == 0,
		after - before, target, back == base);
	free_page((unsigned long)buf);
}

static int __init thinhv_attack_init(void)
{
	if (!thinhv_present()) {
		pr_info(PFX "attack %s: attempts=0 succeeded=0 skipped=no-hypervisor\n", attack);
		return 0;
	}
	if (!strcmp(attack, "hc-mmio"))
		hc_mmio();
	else if (!strcmp(attack, "invd"))
		invd_attack();
	else if (!strcmp(attack, "ipi-unknown"))
		ipi_unknown();
	else if (!strcmp(attack, "apic-reloc-init"))
		apic_reloc_init();
	else if (!strcmp(attack, "ipi-partition"))
		ipi_partition();
	else
		pr_info(PFX "unknown attack \"%s\"\n", attack);
	return 0;
}

static void __exit thinhv_attack_exit(void)
{
}

module_init(thinhv_attack_init);
module_exit(thinhv_attack_exit);
