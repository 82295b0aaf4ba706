/* A stand-in Vulkan driver for the tests: Mesa's software driver (lavapipe) does the work, and
 * this layer over it changes what it reports or makes one step fail, as a real GPU driver could:
 *
 *   STANDIN_REAL_DRIVER      lavapipe's library (from its ICD manifest); required
 *   STANDIN_TYPE             the device type it reports: 1 integrated GPU (default), 2 discrete
 *   STANDIN_HEAP_MIB         the size (and budget) it reports for each device-local heap
 *   STANDIN_FAIL_DEVICE      vkCreateDevice fails with VK_ERROR_INITIALIZATION_FAILED
 *   STANDIN_FAIL_ALLOC_MIB   vkAllocateMemory of more than this fails (out of device memory)
 *   STANDIN_CRASH            the driver crashes (abort) while listing its devices
 *
 * The loader is pointed at it with VK_ICD_FILENAMES (a manifest the tests write). Every call it
 * does not change goes to lavapipe unchanged, whose handles (with the loader's magic) it passes on.
 */
#include <vulkan/vulkan.h>
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef PFN_vkVoidFunction (*gipa_t)(VkInstance, const char *);
typedef VkResult (*negotiate_t)(uint32_t *);

static void *real;
static gipa_t real_gipa, real_gpdpa;
static PFN_vkGetPhysicalDeviceProperties real_props;
static PFN_vkGetPhysicalDeviceProperties2 real_props2;
static PFN_vkGetPhysicalDeviceMemoryProperties real_mem;
static PFN_vkGetPhysicalDeviceMemoryProperties2 real_mem2;
static PFN_vkCreateDevice real_create_device;
static PFN_vkEnumeratePhysicalDevices real_enumerate;
static PFN_vkGetDeviceProcAddr real_gdpa;
static PFN_vkAllocateMemory real_alloc;

static void open_real(void) {
    if (real) return;
    const char *path = getenv("STANDIN_REAL_DRIVER");
    real = path ? dlopen(path, RTLD_NOW | RTLD_LOCAL) : NULL;
    if (!real) { fprintf(stderr, "vulkan stand-in: cannot open STANDIN_REAL_DRIVER\n"); abort(); }
    real_gipa = (gipa_t)dlsym(real, "vk_icdGetInstanceProcAddr");
    real_gpdpa = (gipa_t)dlsym(real, "vk_icdGetPhysicalDeviceProcAddr");
}

static void patch_props(VkPhysicalDeviceProperties *p) {
    const char *t = getenv("STANDIN_TYPE");
    char name[VK_MAX_PHYSICAL_DEVICE_NAME_SIZE];
    p->deviceType = t ? (VkPhysicalDeviceType)atoi(t) : VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU;
    snprintf(name, sizeof name, "Stand-in GPU on %s", p->deviceName);
    memcpy(p->deviceName, name, sizeof name);
}

static void VKAPI_CALL props(VkPhysicalDevice pd, VkPhysicalDeviceProperties *p) {
    real_props(pd, p);
    patch_props(p);
}

static void VKAPI_CALL props2(VkPhysicalDevice pd, VkPhysicalDeviceProperties2 *p) {
    real_props2(pd, p);
    patch_props(&p->properties);
}

static void patch_mem(VkPhysicalDeviceMemoryProperties *m, VkPhysicalDeviceMemoryBudgetPropertiesEXT *budget) {
    const char *h = getenv("STANDIN_HEAP_MIB");
    if (!h) return;
    VkDeviceSize size = (VkDeviceSize)atoll(h) << 20;
    for (uint32_t i = 0; i < m->memoryHeapCount; i++) {
        if (!(m->memoryHeaps[i].flags & VK_MEMORY_HEAP_DEVICE_LOCAL_BIT)) continue;
        m->memoryHeaps[i].size = size;
        if (budget) { budget->heapBudget[i] = size; budget->heapUsage[i] = 0; }
    }
}

static void VKAPI_CALL mem(VkPhysicalDevice pd, VkPhysicalDeviceMemoryProperties *m) {
    real_mem(pd, m);
    patch_mem(m, NULL);
}

static void VKAPI_CALL mem2(VkPhysicalDevice pd, VkPhysicalDeviceMemoryProperties2 *m) {
    real_mem2(pd, m);
    VkPhysicalDeviceMemoryBudgetPropertiesEXT *budget = NULL;
    for (VkBaseOutStructure *s = (VkBaseOutStructure *)m->pNext; s; s = s->pNext)
        if (s->sType == VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_MEMORY_BUDGET_PROPERTIES_EXT)
            budget = (VkPhysicalDeviceMemoryBudgetPropertiesEXT *)s;
    patch_mem(&m->memoryProperties, budget);
}

static VkResult VKAPI_CALL enumerate(VkInstance inst, uint32_t *count, VkPhysicalDevice *out) {
    if (getenv("STANDIN_CRASH")) abort();
    return real_enumerate(inst, count, out);
}

static VkResult VKAPI_CALL create_device(VkPhysicalDevice pd, const VkDeviceCreateInfo *info,
                                         const VkAllocationCallbacks *a, VkDevice *out) {
    if (getenv("STANDIN_FAIL_DEVICE")) return VK_ERROR_INITIALIZATION_FAILED;
    return real_create_device(pd, info, a, out);
}

static VkResult VKAPI_CALL alloc(VkDevice dev, const VkMemoryAllocateInfo *info, const VkAllocationCallbacks *a,
                                 VkDeviceMemory *out) {
    const char *limit = getenv("STANDIN_FAIL_ALLOC_MIB");
    if (limit && info->allocationSize > ((VkDeviceSize)atoll(limit) << 20)) return VK_ERROR_OUT_OF_DEVICE_MEMORY;
    return real_alloc(dev, info, a, out);
}

static PFN_vkVoidFunction VKAPI_CALL gdpa(VkDevice dev, const char *name) {
    if (!strcmp(name, "vkAllocateMemory")) {
        real_alloc = (PFN_vkAllocateMemory)real_gdpa(dev, name);
        return (PFN_vkVoidFunction)alloc;
    }
    if (!strcmp(name, "vkGetDeviceProcAddr")) return (PFN_vkVoidFunction)gdpa;
    return real_gdpa(dev, name);
}

/* The calls changed here, by name; the real function is looked up first through `lookup`. */
static PFN_vkVoidFunction override(gipa_t lookup, VkInstance inst, const char *name) {
    PFN_vkVoidFunction f = lookup(inst, name);
    if (!f) return NULL;
#define SWAP(n, var, type, mine) if (!strcmp(name, n)) { var = (type)f; return (PFN_vkVoidFunction)mine; }
    SWAP("vkGetPhysicalDeviceProperties", real_props, PFN_vkGetPhysicalDeviceProperties, props)
    SWAP("vkGetPhysicalDeviceProperties2", real_props2, PFN_vkGetPhysicalDeviceProperties2, props2)
    SWAP("vkGetPhysicalDeviceProperties2KHR", real_props2, PFN_vkGetPhysicalDeviceProperties2, props2)
    SWAP("vkGetPhysicalDeviceMemoryProperties", real_mem, PFN_vkGetPhysicalDeviceMemoryProperties, mem)
    SWAP("vkGetPhysicalDeviceMemoryProperties2", real_mem2, PFN_vkGetPhysicalDeviceMemoryProperties2, mem2)
    SWAP("vkGetPhysicalDeviceMemoryProperties2KHR", real_mem2, PFN_vkGetPhysicalDeviceMemoryProperties2, mem2)
    SWAP("vkEnumeratePhysicalDevices", real_enumerate, PFN_vkEnumeratePhysicalDevices, enumerate)
    SWAP("vkCreateDevice", real_create_device, PFN_vkCreateDevice, create_device)
    SWAP("vkGetDeviceProcAddr", real_gdpa, PFN_vkGetDeviceProcAddr, gdpa)
    if (!strcmp(name, "vkAllocateMemory")) { real_alloc = (PFN_vkAllocateMemory)f; return (PFN_vkVoidFunction)alloc; }
#undef SWAP
    return f;
}

VKAPI_ATTR VkResult VKAPI_CALL vk_icdNegotiateLoaderICDInterfaceVersion(uint32_t *version) {
    open_real();
    negotiate_t n = (negotiate_t)dlsym(real, "vk_icdNegotiateLoaderICDInterfaceVersion");
    return n ? n(version) : VK_SUCCESS;
}

VKAPI_ATTR PFN_vkVoidFunction VKAPI_CALL vk_icdGetInstanceProcAddr(VkInstance inst, const char *name) {
    open_real();
    return override(real_gipa, inst, name);
}

VKAPI_ATTR PFN_vkVoidFunction VKAPI_CALL vk_icdGetPhysicalDeviceProcAddr(VkInstance inst, const char *name) {
    open_real();
    return real_gpdpa ? override(real_gpdpa, inst, name) : NULL;
}
