/* The part of <rdma/fabric.h> that aiofabric uses from Python (discovery). */

typedef uint64_t fi_addr_t;

#define FI_MSG ...
#define FI_RMA ...
#define FI_READ ...
#define FI_WRITE ...
#define FI_RECV ...
#define FI_SEND ...
#define FI_REMOTE_READ ...
#define FI_REMOTE_WRITE ...
#define FI_HMEM ...

#define FI_MR_LOCAL ...
#define FI_MR_RAW ...
#define FI_MR_VIRT_ADDR ...
#define FI_MR_ALLOCATED ...
#define FI_MR_PROV_KEY ...
#define FI_MR_MMU_NOTIFY ...
#define FI_MR_RMA_EVENT ...
#define FI_MR_ENDPOINT ...
#define FI_MR_HMEM ...

#define FI_MAJOR_VERSION ...
#define FI_MINOR_VERSION ...

enum fi_ep_type { FI_EP_UNSPEC, FI_EP_MSG, FI_EP_DGRAM, FI_EP_RDM, ... };
enum fi_progress { FI_PROGRESS_UNSPEC, FI_PROGRESS_AUTO, FI_PROGRESS_MANUAL, ... };
enum fi_threading { FI_THREAD_UNSPEC, FI_THREAD_SAFE, FI_THREAD_FID, FI_THREAD_DOMAIN,
                    FI_THREAD_COMPLETION, FI_THREAD_ENDPOINT, ... };

struct fi_tx_attr { uint64_t caps; size_t inject_size; size_t size; ...; };
struct fi_rx_attr { uint64_t caps; size_t size; ...; };
struct fi_ep_attr { enum fi_ep_type type; uint32_t protocol; size_t max_msg_size; ...; };
struct fi_domain_attr {
    char *name;
    enum fi_threading threading;
    enum fi_progress control_progress;
    enum fi_progress data_progress;
    int mr_mode;
    size_t mr_key_size;
    size_t cq_data_size;
    size_t max_ep_tx_ctx;
    ...;
};
struct fi_fabric_attr { char *name; char *prov_name; uint32_t prov_version; ...; };
struct fi_info {
    struct fi_info *next;
    uint64_t caps;
    uint64_t mode;
    uint32_t addr_format;
    size_t src_addrlen;
    size_t dest_addrlen;
    struct fi_tx_attr *tx_attr;
    struct fi_rx_attr *rx_attr;
    struct fi_ep_attr *ep_attr;
    struct fi_domain_attr *domain_attr;
    struct fi_fabric_attr *fabric_attr;
    ...;
};

uint32_t fi_version(void);
int fi_getinfo(uint32_t version, const char *node, const char *service, uint64_t flags,
               const struct fi_info *hints, struct fi_info **info);
void fi_freeinfo(struct fi_info *info);
struct fi_info *fi_allocinfo(void);
char *strdup(const char *s);
