// SPDX-License-Identifier: GPL-2.0
/*
 * kata_upcall_srv: the guest side of dbs-upcall (Dragonball's VMM -> guest kernel hot-plug channel) as a
 * loadable module for a stock distribution kernel (x86-64; built against Debian's linux-headers).
 *
 * Wire format (kata-upcall's README and ../../../shared PROTOCOLS.md "dbs-upcall"): the VMM connects to
 * vsock port 219, sends one service byte ('d', device manager), this module answers with a Connect frame,
 * then every request and reply is a 1024-byte little-endian frame with a 16-byte header
 * {magic_version 0x444D0100, msg_size, msg_type, msg_flags 0}.
 *
 * Device-manager requests served here:
 *   AddMmio / DelMmio  register / unregister a "virtio-mmio" platform device (the stock virtio_mmio
 *                      driver binds to it); mmio_irq is a GSI, mapped with acpi_register_gsi as the ACPI
 *                      path maps the cold-plugged devices' _CRS interrupts (edge, active high)
 *   AddCpu / DelCpu    map an APIC id to a logical CPU and bring it online (acpi_map_cpu,
 *                      arch_register_cpu, add_cpu), or take it offline and unmap it (remove_cpu,
 *                      arch_unregister_cpu, acpi_unmap_cpu); the reply's apic_index is the index of the
 *                      first APIC id not done (count when all were)
 *   AddMem / DelMem / AddPci / DelPci   answered -EOPNOTSUPP (memory grows with virtio-mem)
 *
 * One kernel thread accepts connections and serves them one at a time, and one request at a time. It
 * only talks to the host (peer CID 2): a guest process reaching port 219 over vsock loopback is closed
 * at once. The service byte must come within 10 s of connecting, and a frame once begun within 10 s. A frame whose magic or flags are wrong, or whose type is not a request, closes the
 * connection (the stream cannot be trusted to be in step); a request with a wrong msg_size or values out
 * of range gets an error reply (-EINVAL). Reply buffers are zeroed for every reply.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/acpi.h>
#include <linux/build_bug.h>
#include <linux/cpu.h>
#include <linux/cpumask.h>
#include <linux/delay.h>
#include <linux/device.h>
#include <linux/errno.h>
#include <linux/ioport.h>
#include <linux/kthread.h>
#include <linux/list.h>
#include <linux/module.h>
#include <linux/net.h>
#include <linux/platform_device.h>
#include <linux/sched/signal.h>
#include <linux/sched/task.h>
#include <linux/slab.h>
#include <linux/socket.h>
#include <linux/uio.h>
#include <linux/vm_sockets.h>
#include <net/sock.h>
#include <asm/cpu.h>
#include <asm/smp.h>

#ifndef CONFIG_X86_64
#error "kata_upcall_srv speaks the x86-64 layout of the dbs-upcall CPU messages"
#endif

#define UPCALL_PORT		0xDB
#define DEV_MGR_MSG_SIZE	0x400
#define DEV_MGR_SERVICE_BYTE	'd'
#define DEV_MGR_MAGIC_VERSION	0x444D0100	/* 'D' 'M', version 1.0 */
#define SERVICE_BYTE_TIMEOUT	(10 * HZ)	/* the VMM sends it right after connecting */
#define FRAME_REST_TIMEOUT	(10 * HZ)	/* a frame, once begun, arrives whole within this */
#define SEND_TIMEOUT_SECS	10		/* a VMM that stops reading does not wedge the server */

/* The one peer the server answers: the host. lab/tests/test_upcall_lab.py builds a test copy with
 * KCFLAGS=-DKATA_UPCALL_PEER_CID=1 (vsock loopback) to drive the service from inside a TCG guest; the
 * module the images ship is built without it, and no parameter changes it at run time. */
#ifndef KATA_UPCALL_PEER_CID
#define KATA_UPCALL_PEER_CID	VMADDR_CID_HOST
#endif

#define MMIO_MIN_SIZE		0x200		/* virtio 1.2 §4.2.2: registers, then config space at 0x100 */
#define MMIO_MAX_SIZE		SZ_1M
#define MAX_GSI			1023
#define MAX_MMIO_DEVICES	64
#define APIC_BROADCAST_ID	0xFF

enum devmgr_msg_type {
	CONNECT		= 0,
	ADD_CPU		= 1,
	DEL_CPU		= 2,
	ADD_MEM		= 3,
	DEL_MEM		= 4,
	ADD_MMIO	= 5,
	DEL_MMIO	= 6,
	ADD_PCI		= 7,
	DEL_PCI		= 8,
};

struct devmgr_msg_header {
	__le32 magic_version;
	__le32 msg_size;	/* payload bytes after the header (after ret, in a reply) */
	__le32 msg_type;
	__le32 msg_flags;
};

struct mmio_payload {
	__le64 mmio_base;
	__le64 mmio_size;
	__le32 mmio_irq;
	__le32 pad;		/* C layout of the upstream struct: tail padding to 8 bytes */
};

struct cpu_payload {
	u8 count;
	u8 apic_ver;
	u8 apic_ids[256];
};

struct devmgr_req {
	struct devmgr_msg_header header;
	union {
		u8 raw[DEV_MGR_MSG_SIZE - sizeof(struct devmgr_msg_header)];
		struct mmio_payload mmio;
		struct cpu_payload cpu;
	} body;
};

struct devmgr_reply {
	struct devmgr_msg_header header;
	__le32 ret;
	union {
		u8 raw[DEV_MGR_MSG_SIZE - sizeof(struct devmgr_msg_header) - sizeof(__le32)];
		__le32 apic_index;
	} body;
};

static_assert(sizeof(struct devmgr_msg_header) == 16);
static_assert(sizeof(struct mmio_payload) == 24);
static_assert(sizeof(struct cpu_payload) == 258);
static_assert(sizeof(struct devmgr_req) == DEV_MGR_MSG_SIZE);
static_assert(sizeof(struct devmgr_reply) == DEV_MGR_MSG_SIZE);

struct upcall_buffers {
	struct devmgr_req req;
	struct devmgr_reply rep;
};

/* A virtio-mmio device this module registered; only the server thread (and module exit after it has
 * stopped) touches the list, so it needs no lock. */
struct upcall_mmio {
	struct list_head node;
	u64 base;
	u64 size;
	u32 gsi;
	struct platform_device *pdev;
};

static unsigned int port = UPCALL_PORT;
module_param(port, uint, 0444);
MODULE_PARM_DESC(port, "vsock port to listen on (default 219, dbs-upcall's)");

static struct socket *listener;
static struct task_struct *server;
static struct upcall_buffers *buffers;	/* the server thread's request and reply frames */
static bool stopping;
static LIST_HEAD(mmio_devices);
static unsigned int mmio_count;

/* -- socket helpers ------------------------------------------------------------------------------------ */

/* Read exactly len bytes; returns len, or what came before EOF / an error (a short read). */
static int recv_exact(struct socket *sock, void *buf, size_t len)
{
	size_t done = 0;

	while (done < len) {
		struct kvec vec = { .iov_base = buf + done, .iov_len = len - done };
		struct msghdr msg = { };
		int n = kernel_recvmsg(sock, &msg, &vec, 1, vec.iov_len, MSG_WAITALL);

		if (n <= 0)
			return done ? done : n;
		done += n;
	}
	return done;
}

static int send_exact(struct socket *sock, const void *buf, size_t len)
{
	size_t done = 0;

	while (done < len) {
		struct kvec vec = { .iov_base = (void *)buf + done, .iov_len = len - done };
		struct msghdr msg = { .msg_flags = MSG_NOSIGNAL };
		int n = kernel_sendmsg(sock, &msg, &vec, 1, vec.iov_len);

		if (n <= 0)
			return n ? n : -EPIPE;
		done += n;
	}
	return 0;
}

static void set_rcvtimeo(struct socket *sock, long timeo)
{
	lock_sock(sock->sk);
	sock->sk->sk_rcvtimeo = timeo;
	release_sock(sock->sk);
}

/* One request frame: wait as long as it takes for its first byte (requests come when the VMM has one),
 * then FRAME_REST_TIMEOUT for the rest, so a frame cut short leaves no connection hanging. */
static int recv_frame(struct socket *sock, u8 *frame)
{
	int n;

	set_rcvtimeo(sock, MAX_SCHEDULE_TIMEOUT);
	n = recv_exact(sock, frame, 1);
	if (n != 1)
		return n;
	set_rcvtimeo(sock, FRAME_REST_TIMEOUT);
	n = recv_exact(sock, frame + 1, DEV_MGR_MSG_SIZE - 1);
	return n < 0 ? n : n + 1;
}

static void fill_header(struct devmgr_msg_header *header, u32 type, u32 size)
{
	header->magic_version = cpu_to_le32(DEV_MGR_MAGIC_VERSION);
	header->msg_size = cpu_to_le32(size);
	header->msg_type = cpu_to_le32(type);
	header->msg_flags = 0;
}

/* -- virtio-mmio --------------------------------------------------------------------------------------- */

static int map_gsi(u32 gsi)
{
#ifdef CONFIG_ACPI
	if (!acpi_disabled)
		return acpi_register_gsi(NULL, gsi, ACPI_EDGE_SENSITIVE, ACPI_ACTIVE_HIGH);
#endif
	return gsi < NR_IRQS_LEGACY ? (int)gsi : -EINVAL;
}

static void unmap_gsi(u32 gsi)
{
#ifdef CONFIG_ACPI
	if (!acpi_disabled)
		acpi_unregister_gsi(gsi);
#endif
}

static int check_mmio(u64 base, u64 size, u32 gsi)
{
	if (size < MMIO_MIN_SIZE || size > MMIO_MAX_SIZE || !PAGE_ALIGNED(base))
		return -EINVAL;
	if (base + (size - 1) < base || base + (size - 1) > iomem_resource.end)
		return -EINVAL;
	if (gsi == 0 || gsi > MAX_GSI)
		return -EINVAL;
	return 0;
}

static void remove_mmio(struct upcall_mmio *dev)
{
	platform_device_unregister(dev->pdev);
	unmap_gsi(dev->gsi);
	list_del(&dev->node);
	mmio_count--;
	pr_info("removed virtio-mmio at %#llx size %#llx gsi %u\n", dev->base, dev->size, dev->gsi);
	kfree(dev);
}

static int add_mmio(u64 base, u64 size, u32 gsi)
{
	struct platform_device_info info = {
		.name = "virtio-mmio",
		.id = PLATFORM_DEVID_AUTO,
		.num_res = 2,
	};
	struct resource res[2] = {};
	struct upcall_mmio *dev;
	bool bound;
	int irq, err;

	err = check_mmio(base, size, gsi);
	if (err)
		return err;
	list_for_each_entry(dev, &mmio_devices, node) {
		if (dev->gsi == gsi || (base < dev->base + dev->size && dev->base < base + size))
			return -EEXIST;
	}
	if (mmio_count >= MAX_MMIO_DEVICES)
		return -ENOSPC;
	dev = kzalloc(sizeof(*dev), GFP_KERNEL);
	if (!dev)
		return -ENOMEM;
	irq = map_gsi(gsi);
	if (irq < 0) {
		err = irq;
		goto free;
	}
	res[0] = (struct resource)DEFINE_RES_MEM(base, size);
	res[1] = (struct resource)DEFINE_RES_IRQ(irq);
	info.res = res;
	dev->pdev = platform_device_register_full(&info);
	if (IS_ERR(dev->pdev)) {
		err = PTR_ERR(dev->pdev);
		goto unmap;
	}
	/* virtio_mmio probes synchronously: no driver now means its probe failed (no device answers at
	 * base, the window is taken, the IRQ cannot be had) or virtio_mmio is not loaded */
	device_lock(&dev->pdev->dev);
	bound = dev->pdev->dev.driver != NULL;
	device_unlock(&dev->pdev->dev);
	if (!bound) {
		platform_device_unregister(dev->pdev);
		err = -ENODEV;
		goto unmap;
	}
	dev->base = base;
	dev->size = size;
	dev->gsi = gsi;
	list_add_tail(&dev->node, &mmio_devices);
	mmio_count++;
	pr_info("added virtio-mmio at %#llx size %#llx gsi %u (irq %d)\n", base, size, gsi, irq);
	return 0;

unmap:
	unmap_gsi(gsi);
free:
	kfree(dev);
	return err;
}

static int del_mmio(u64 base, u64 size, u32 gsi)
{
	struct upcall_mmio *dev;
	int err = check_mmio(base, size, gsi);

	if (err)
		return err;
	list_for_each_entry(dev, &mmio_devices, node) {
		if (dev->base == base && dev->size == size && dev->gsi == gsi) {
			remove_mmio(dev);
			return 0;
		}
	}
	return -ENODEV;
}

static void serve_mmio(const struct devmgr_req *req, struct devmgr_reply *rep, u32 type, u32 size)
{
	u64 base = le64_to_cpu(req->body.mmio.mmio_base);
	u64 len = le64_to_cpu(req->body.mmio.mmio_size);
	u32 gsi = le32_to_cpu(req->body.mmio.mmio_irq);
	int err;

	if (size != sizeof(struct mmio_payload))
		err = -EINVAL;
	else if (type == ADD_MMIO)
		err = add_mmio(base, len, gsi);
	else
		err = del_mmio(base, len, gsi);
	if (err)
		pr_warn("%s %#llx size %#llx gsi %u failed: %d\n", type == ADD_MMIO ? "AddMmio" : "DelMmio",
			base, len, gsi, err);
	fill_header(&rep->header, type, 0);
	rep->ret = cpu_to_le32(err);
}

/* -- vCPUs --------------------------------------------------------------------------------------------- */

/*
 * The kernel's own ACPI processor hot-add (acpi_processor_hotadd_init) holds cpu_add_remove_lock and
 * cpu_hotplug_lock around acpi_map_cpu and arch_register_cpu; neither lock is exported to modules. This
 * module serialises its own requests (one thread), and a VM without ACPI processor hot-plug has no
 * other writer of the CPU maps; add_cpu / remove_cpu take the device hot-plug lock themselves.
 */

static int apic_to_cpu(u32 apic_id)
{
	int cpu;

	for_each_present_cpu(cpu) {
		if (per_cpu(x86_cpu_to_apicid, cpu) == apic_id)
			return cpu;
	}
	return -1;
}

static int add_one_cpu(u32 apic_id)
{
	bool mapped = false, registered = false;
	int cpu = apic_to_cpu(apic_id);
	int err;

	if (apic_id == APIC_BROADCAST_ID)
		return -EINVAL;
	if (cpu < 0) {
		/* no ACPI handle: the NUMA node and _PDC lookups fail soft and the CPU gets no node */
		err = acpi_map_cpu(NULL, apic_id, apic_id, &cpu);
		if (err)
			return err;	/* past nr_cpu_ids: boot with possible_cpus=N */
		mapped = true;
	}
	if (!get_cpu_device(cpu)) {
		err = arch_register_cpu(cpu);
		if (err)
			goto unmap;
		registered = true;
	}
	if (cpu_online(cpu))
		return 0;
	err = add_cpu(cpu);
	if (!err) {
		pr_info("vCPU apic %u is cpu%d, online\n", apic_id, cpu);
		return 0;
	}
	if (registered)
		arch_unregister_cpu(cpu);
unmap:
	if (mapped)
		acpi_unmap_cpu(cpu);
	return err;
}

static int del_one_cpu(u32 apic_id)
{
	int cpu = apic_to_cpu(apic_id);
	int err;

	if (cpu < 0)
		return -ENODEV;
	if (cpu == 0)
		return -EPERM;	/* the boot CPU stays */
	if (cpu_online(cpu)) {
		err = remove_cpu(cpu);
		if (err)
			return err;
	}
	if (get_cpu_device(cpu))
		arch_unregister_cpu(cpu);
	if (cpu_online(cpu)) {
		/* brought back online through sysfs in between: leave it as it is */
		arch_register_cpu(cpu);
		return -EBUSY;
	}
	acpi_unmap_cpu(cpu);
	pr_info("vCPU apic %u (cpu%d) offline and removed\n", apic_id, cpu);
	return 0;
}

static void serve_cpu(const struct devmgr_req *req, struct devmgr_reply *rep, u32 type, u32 size)
{
	const struct cpu_payload *cpus = &req->body.cpu;
	unsigned int i = 0;
	int err = 0;

	if (size != sizeof(struct cpu_payload)) {
		err = -EINVAL;
	} else {
		for (i = 0; i < cpus->count; i++) {
			u32 apic_id = cpus->apic_ids[i];

			err = type == ADD_CPU ? add_one_cpu(apic_id) : del_one_cpu(apic_id);
			if (err) {
				pr_warn("%s apic %u failed: %d\n", type == ADD_CPU ? "AddCpu" : "DelCpu",
					apic_id, err);
				break;
			}
		}
	}
	fill_header(&rep->header, type, sizeof(rep->body.apic_index));
	rep->ret = cpu_to_le32(err);
	rep->body.apic_index = cpu_to_le32(i);
}

/* -- the service --------------------------------------------------------------------------------------- */

/* Fill rep for req; false when the connection must close instead (it is not in step any more). */
static bool serve_request(const struct devmgr_req *req, struct devmgr_reply *rep)
{
	u32 magic = le32_to_cpu(req->header.magic_version);
	u32 size = le32_to_cpu(req->header.msg_size);
	u32 type = le32_to_cpu(req->header.msg_type);
	u32 flags = le32_to_cpu(req->header.msg_flags);

	memset(rep, 0, sizeof(*rep));
	if (magic != DEV_MGR_MAGIC_VERSION || flags != 0) {
		pr_warn_ratelimited("frame with magic %#x flags %#x: closing the connection\n", magic, flags);
		return false;
	}
	switch (type) {
	case ADD_MMIO:
	case DEL_MMIO:
		serve_mmio(req, rep, type, size);
		return true;
	case ADD_CPU:
	case DEL_CPU:
		serve_cpu(req, rep, type, size);
		return true;
	case ADD_MEM:
	case DEL_MEM:
	case ADD_PCI:
	case DEL_PCI:
		fill_header(&rep->header, type, 0);
		rep->ret = cpu_to_le32(-EOPNOTSUPP);
		return true;
	default:
		pr_warn_ratelimited("frame of type %#x is no request: closing the connection\n", type);
		return false;
	}
}

static void serve_device_manager(struct socket *conn, struct upcall_buffers *buf)
{
	int n;

	memset(&buf->rep, 0, sizeof(buf->rep));
	fill_header(&buf->rep.header, CONNECT, 0);
	if (send_exact(conn, &buf->rep, DEV_MGR_MSG_SIZE))
		return;
	while (!READ_ONCE(stopping)) {
		n = recv_frame(conn, (u8 *)&buf->req);
		if (n != DEV_MGR_MSG_SIZE) {
			if (n > 0)
				pr_warn_ratelimited("short frame of %d bytes: closing the connection\n", n);
			return;
		}
		if (!serve_request(&buf->req, &buf->rep))
			return;
		if (send_exact(conn, &buf->rep, DEV_MGR_MSG_SIZE))
			return;
	}
}

static void serve_connection(struct socket *conn, struct upcall_buffers *buf)
{
	struct sockaddr_vm peer = {};
	char service;
	int n;

	n = kernel_getpeername(conn, (struct sockaddr *)&peer);
	if (n < 0 || peer.svm_family != AF_VSOCK || peer.svm_cid != KATA_UPCALL_PEER_CID) {
		pr_warn_ratelimited("connection from cid %u refused: only the host may ask\n", peer.svm_cid);
		return;
	}
	sock_set_sndtimeo(conn->sk, SEND_TIMEOUT_SECS);
	set_rcvtimeo(conn, SERVICE_BYTE_TIMEOUT);
	n = recv_exact(conn, &service, 1);
	if (n != 1)
		return;
	if (service != DEV_MGR_SERVICE_BYTE) {
		pr_warn_ratelimited("unknown service %#x: closing the connection\n", (u8)service);
		return;
	}
	serve_device_manager(conn, buf);
}

static int upcall_server(void *unused)
{
	allow_signal(SIGKILL);	/* module exit interrupts accept and recv with it */
	while (!READ_ONCE(stopping)) {
		struct socket *conn;
		int err = kernel_accept(listener, &conn, 0);

		if (err) {
			if (signal_pending(current)) {
				if (!READ_ONCE(stopping))
					flush_signals(current);
				continue;
			}
			pr_warn_ratelimited("accept failed: %d\n", err);
			msleep_interruptible(1000);
			continue;
		}
		serve_connection(conn, buffers);
		kernel_sock_shutdown(conn, SHUT_RDWR);
		sock_release(conn);
	}
	return 0;
}

static int __init kata_upcall_init(void)
{
	struct sockaddr_vm addr = {
		.svm_family = AF_VSOCK,
		.svm_port = port,
		.svm_cid = VMADDR_CID_ANY,
	};
	int err;

	buffers = kzalloc(sizeof(*buffers), GFP_KERNEL);
	if (!buffers)
		return -ENOMEM;
	err = sock_create_kern(&init_net, AF_VSOCK, SOCK_STREAM, 0, &listener);
	if (err) {
		pr_err("no vsock (load vmw_vsock_virtio_transport first): %d\n", err);
		goto free;
	}
	err = kernel_bind(listener, (struct sockaddr *)&addr, sizeof(addr));
	if (!err)
		err = kernel_listen(listener, 4);
	if (err) {
		pr_err("cannot listen on vsock port %u: %d\n", port, err);
		goto release;
	}
	server = kthread_create(upcall_server, NULL, "kata-upcall");
	if (IS_ERR(server)) {
		err = PTR_ERR(server);
		goto release;
	}
	get_task_struct(server);	/* kthread_stop after the thread may have returned */
	wake_up_process(server);
	pr_info("listening on vsock port %u (cpus: %u possible, %u present)\n", port, nr_cpu_ids,
		num_present_cpus());
	return 0;

release:
	sock_release(listener);
free:
	kfree(buffers);
	return err;
}

static void __exit kata_upcall_exit(void)
{
	struct upcall_mmio *dev, *next;

	WRITE_ONCE(stopping, true);
	send_sig(SIGKILL, server, 1);
	kthread_stop(server);
	put_task_struct(server);
	sock_release(listener);
	kfree(buffers);
	/* the devices this module added go with it: nothing could remove them afterwards */
	list_for_each_entry_safe_reverse(dev, next, &mmio_devices, node)
		remove_mmio(dev);
}

module_init(kata_upcall_init);
module_exit(kata_upcall_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("dbs-upcall device-manager server (virtio-mmio and vCPU hot-plug over vsock port 219)");
MODULE_SOFTDEP("pre: vmw_vsock_virtio_transport virtio_mmio");
