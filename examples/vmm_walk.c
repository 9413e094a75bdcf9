/*
 * vmm_walk: what a VMM does with one VFIO device before and during a live migration,
 * in plain C against the Linux uAPI (iommufd + the VFIO device cdev):
 *
 *   open /dev/iommu and the device cdev, VFIO_DEVICE_BIND_IOMMUFD, IOMMU_IOAS_ALLOC,
 *   IOMMU_HWPT_ALLOC with dirty tracking, VFIO_DEVICE_ATTACH_IOMMUFD_PT, map a buffer of
 *   its own with IOMMU_IOAS_MAP, IOMMU_HWPT_SET_DIRTY_TRACKING, IOMMU_HWPT_GET_DIRTY_BITMAP,
 *   then the migration walk RUNNING -> STOP_COPY (read the data fd to EOF) -> STOP.
 *
 * It runs on a real host with a migratable device, or on vfiomig's model:
 *
 *   gcc -I $ZIG/lib/libc/include/any-linux-any -I $ZIG/lib/libc/include/x86-linux-any \
 *       -o vmm_walk examples/vmm_walk.c
 *   vfiomig run --device reference,dma_logging=1 --dma-pages 1 -- ./vmm_walk
 *
 * The device is argv[1], else the first of $VFIOMIG_DEVICES (set by `vfiomig run`), else
 * /dev/vfio/devices/vfio0. Exit status 0 when every step worked; 1 and a message otherwise.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/iommufd.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define NPAGES 16
#define PAGE 4096UL
#define IOVA 0x100000UL

static int fail(const char *what)
{
	fprintf(stderr, "vmm_walk: %s: %s\n", what, strerror(errno));
	exit(1);
}

static const char *state_name(uint32_t s)
{
	static const char *names[] = {"ERROR", "STOP", "RUNNING", "STOP_COPY", "RESUMING",
				      "RUNNING_P2P", "PRE_COPY", "PRE_COPY_P2P"};
	return s < sizeof(names) / sizeof(names[0]) ? names[s] : "?";
}

/* VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, GET or SET; returns the data fd (or -1). */
static int mig_state(int dev, uint32_t flags, uint32_t *state)
{
	uint64_t buf[(sizeof(struct vfio_device_feature) +
		      sizeof(struct vfio_device_feature_mig_state) + 7) / 8] = {0};
	struct vfio_device_feature *f = (void *)buf;
	struct vfio_device_feature_mig_state *ms = (void *)f->data;

	f->argsz = sizeof(buf);
	f->flags = flags | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE;
	ms->device_state = *state;
	if (ioctl(dev, VFIO_DEVICE_FEATURE, f))
		fail("VFIO_DEVICE_FEATURE MIG_DEVICE_STATE");
	*state = ms->device_state;
	return ms->data_fd;
}

static uint64_t stop_copy_size(int dev)
{
	uint64_t buf[(sizeof(struct vfio_device_feature) +
		      sizeof(struct vfio_device_feature_mig_data_size) + 7) / 8] = {0};
	struct vfio_device_feature *f = (void *)buf;

	f->argsz = sizeof(buf);
	f->flags = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DATA_SIZE;
	if (ioctl(dev, VFIO_DEVICE_FEATURE, f))
		fail("VFIO_DEVICE_FEATURE MIG_DATA_SIZE");
	return ((struct vfio_device_feature_mig_data_size *)f->data)->stop_copy_length;
}

static int dirty_pages(int iommufd, uint32_t hwpt)
{
	uint64_t bitmap = 0;
	struct iommu_hwpt_get_dirty_bitmap get = {
		.size = sizeof(get),
		.hwpt_id = hwpt,
		.iova = IOVA,
		.length = NPAGES * PAGE,
		.page_size = PAGE,
		.data = (uintptr_t)&bitmap,
	};

	if (ioctl(iommufd, IOMMU_HWPT_GET_DIRTY_BITMAP, &get))
		fail("IOMMU_HWPT_GET_DIRTY_BITMAP");
	return __builtin_popcountll(bitmap);
}

int main(int argc, char **argv)
{
	const char *path = argc > 1 ? argv[1] : getenv("VFIOMIG_DEVICES");
	char devpath[256];
	int iommufd, dev, data_fd, written = 0;
	uint32_t state;
	uint64_t total = 0, size;
	unsigned char *buf, chunk[4096];
	ssize_t n;

	snprintf(devpath, sizeof(devpath), "%s", path && *path ? path : "/dev/vfio/devices/vfio0");
	devpath[strcspn(devpath, ",")] = 0; /* the first of a comma-separated list */

	iommufd = open("/dev/iommu", O_RDWR);
	if (iommufd < 0)
		fail("open /dev/iommu");
	dev = open(devpath, O_RDWR);
	if (dev < 0)
		fail(devpath);

	struct vfio_device_bind_iommufd bind = {.argsz = sizeof(bind), .iommufd = iommufd};
	if (ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &bind))
		fail("VFIO_DEVICE_BIND_IOMMUFD");
	printf("device %s: bound to iommufd as dev_id %u\n", devpath, bind.out_devid);

	struct iommu_ioas_alloc ioas = {.size = sizeof(ioas)};
	if (ioctl(iommufd, IOMMU_IOAS_ALLOC, &ioas))
		fail("IOMMU_IOAS_ALLOC");
	struct iommu_hwpt_alloc hwpt = {
		.size = sizeof(hwpt),
		.flags = IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
		.dev_id = bind.out_devid,
		.pt_id = ioas.out_ioas_id,
	};
	if (ioctl(iommufd, IOMMU_HWPT_ALLOC, &hwpt))
		fail("IOMMU_HWPT_ALLOC (dirty tracking)");
	struct vfio_device_attach_iommufd_pt attach = {
		.argsz = sizeof(attach),
		.pt_id = hwpt.out_hwpt_id,
	};
	if (ioctl(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach))
		fail("VFIO_DEVICE_ATTACH_IOMMUFD_PT");
	printf("ioas %u, hwpt %u with dirty tracking, device attached\n", ioas.out_ioas_id,
	       hwpt.out_hwpt_id);

	/* Guest RAM stands here as a buffer of this process: the device's DMA lands in it. */
	buf = mmap(NULL, NPAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1,
		   0);
	if (buf == MAP_FAILED)
		fail("mmap");
	memset(buf, 0, NPAGES * PAGE);
	struct iommu_ioas_map map = {
		.size = sizeof(map),
		.flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE |
			 IOMMU_IOAS_MAP_WRITEABLE,
		.ioas_id = ioas.out_ioas_id,
		.user_va = (uintptr_t)buf,
		.length = NPAGES * PAGE,
		.iova = IOVA,
	};
	if (ioctl(iommufd, IOMMU_IOAS_MAP, &map))
		fail("IOMMU_IOAS_MAP");
	printf("mapped %d pages of this process at iova %#lx\n", NPAGES, IOVA);

	struct iommu_hwpt_set_dirty_tracking track = {
		.size = sizeof(track),
		.flags = IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
		.hwpt_id = hwpt.out_hwpt_id,
	};
	if (ioctl(iommufd, IOMMU_HWPT_SET_DIRTY_TRACKING, &track))
		fail("IOMMU_HWPT_SET_DIRTY_TRACKING");
	printf("dirty tracking enabled\n");
	printf("dirty pages, first read (clears them): %d\n", dirty_pages(iommufd, hwpt.out_hwpt_id));
	printf("dirty pages, second read: %d\n", dirty_pages(iommufd, hwpt.out_hwpt_id));

	for (int p = 0; p < NPAGES; p++)
		written += buf[p * PAGE] != 0;
	printf("pages of the buffer the device wrote: %d\n", written);

	state = 0;
	mig_state(dev, VFIO_DEVICE_FEATURE_GET, &state);
	printf("migration state: %s\n", state_name(state));
	size = stop_copy_size(dev);
	state = VFIO_DEVICE_STATE_STOP_COPY;
	data_fd = mig_state(dev, VFIO_DEVICE_FEATURE_SET, &state);
	printf("RUNNING -> %s: data fd %s, stop-copy size %llu bytes\n", state_name(state),
	       data_fd >= 0 ? "open" : "missing", (unsigned long long)size);
	if (data_fd < 0)
		return 1;
	while ((n = read(data_fd, chunk, sizeof(chunk))) > 0)
		total += (uint64_t)n;
	if (n < 0)
		fail("read data fd");
	printf("read %llu bytes of device state to EOF\n", (unsigned long long)total);
	state = VFIO_DEVICE_STATE_STOP;
	mig_state(dev, VFIO_DEVICE_FEATURE_SET, &state);
	close(data_fd);
	printf("STOP_COPY -> %s\n", state_name(state));
	printf("dirty pages after the stop (written before it): %d\n",
	       dirty_pages(iommufd, hwpt.out_hwpt_id));

	struct iommu_ioas_unmap unmap = {
		.size = sizeof(unmap),
		.ioas_id = ioas.out_ioas_id,
		.iova = IOVA,
		.length = NPAGES * PAGE,
	};
	if (ioctl(iommufd, IOMMU_IOAS_UNMAP, &unmap))
		fail("IOMMU_IOAS_UNMAP");
	printf("unmapped %llu bytes\n", (unsigned long long)unmap.length);
	close(dev);
	close(iommufd);
	return 0;
}
