// SPDX-License-Identifier: GPL-2.0
/*
 * edge_tryboot: the Raspberry Pi firmware's one-boot "tryboot" flag for kernels that lack it.
 *
 * `reboot "0 tryboot"` asks the firmware to read tryboot.txt instead of config.txt for the next boot
 * only (the Pi image's A/B trial of a new root slot). The Raspberry Pi kernel passes the flag on from
 * its firmware driver; Debian's kernel (mainline) does not, and reboots plainly. This module does what
 * that driver does: at a restart whose command holds " tryboot", it sends SET_REBOOT_FLAGS (tryboot)
 * to the firmware over the mailbox, through the mainline firmware driver's exported property call.
 * /usr/lib/edge/reboot loads it just before such a reboot. Where there is no Raspberry Pi firmware
 * (another board, QEMU's virt machine) it does not load (ENODEV).
 */
#include <linux/module.h>
#include <linux/notifier.h>
#include <linux/of.h>
#include <linux/reboot.h>
#include <linux/string.h>
#include <soc/bcm2835/raspberrypi-firmware.h>

#define SET_REBOOT_FLAGS 0x00038064 /* the firmware's property tag (RPI_FIRMWARE_SET_REBOOT_FLAGS) */
#define FLAG_TRYBOOT 0x1

static struct rpi_firmware *fw;

static int edge_tryboot_restart(struct notifier_block *nb, unsigned long action, void *cmd)
{
	u32 flags = FLAG_TRYBOOT;
	int ret;

	if (action != SYS_RESTART || !cmd || !strstr(cmd, " tryboot"))
		return NOTIFY_DONE;
	ret = rpi_firmware_property(fw, SET_REBOOT_FLAGS, &flags, sizeof(flags));
	if (ret)
		pr_err("edge_tryboot: the firmware did not take the tryboot flag (%d): a plain reboot\n", ret);
	else
		pr_info("edge_tryboot: tryboot flag set: the next boot reads tryboot.txt\n");
	return NOTIFY_DONE;
}

static struct notifier_block edge_tryboot_nb = {
	.notifier_call = edge_tryboot_restart,
};

static int __init edge_tryboot_init(void)
{
	struct device_node *np;
	int ret;

	np = of_find_compatible_node(NULL, NULL, "raspberrypi,bcm2835-firmware");
	if (!np)
		return -ENODEV;
	fw = rpi_firmware_get(np);
	of_node_put(np);
	if (!fw)
		return -ENODEV;
	ret = register_reboot_notifier(&edge_tryboot_nb);
	if (ret)
		rpi_firmware_put(fw);
	return ret;
}

static void __exit edge_tryboot_exit(void)
{
	unregister_reboot_notifier(&edge_tryboot_nb);
	rpi_firmware_put(fw);
}

module_init(edge_tryboot_init);
module_exit(edge_tryboot_exit);
MODULE_DESCRIPTION("Raspberry Pi firmware tryboot flag at reboot \"0 tryboot\"");
MODULE_LICENSE("GPL");
