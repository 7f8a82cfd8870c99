// apply_tar: libarchive decodes on a fiber (see fiber.hpp); the coroutine on the loop turns the
// decoded entries into ring operations. Small files are queued and written in batches on the
// offload pool, so both cores create files while the loop decodes (see write_small_files); large
// files are streamed through the ring block by block straight from libarchive's buffer;
// directories, links and metadata go through the ring or short syscalls on the loop.
//
// Safety: every name is cleaned lexically first (Docker's rules); parents are opened with
// openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS) relative to the target,
// and every child is created relative to its parent's fd by its single-component base name with
// O_EXCL / AT_SYMLINK_NOFOLLOW semantics, so no symlink is ever followed and nothing outside the
// target can be reached.
#include <archive.h>
#include <archive_entry.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <coroutine>
#include <cstring>
#include <exception>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "fiber.hpp"
#include "layerd/archive/archive.hpp"
#include "layerd/core/loop.hpp"
#include "layerd/core/ops.hpp"
#include "layerd/core/scope.hpp"
#include "layerd/sys/error.hpp"
#include "layerd/sys/fd.hpp"
#include "layerd/sys/syscalls.hpp"
#include "paths.hpp"

namespace layerd::archive {

namespace {

// 4 MiB: a large file is written in blocks this big (with 1 MiB blocks the 1 GiB apply ran at
// 0.94-1.04x `cat`, with 4 MiB 1.03-1.15x; see BENCHMARKS.md). Allocated without
// initialisation, so only the part a read fills is ever touched: an input that arrives in small
// pieces (a socket) costs little memory.
constexpr std::size_t kInputBuffer = 4 << 20;
// The read size while decoding entries: with 4 MiB reads there too, the small-file apply fell
// from 1.29-1.40x to 1.16-1.18x GNU tar (probably: the loop spends longer in each read, with no
// creates submitted meanwhile).
constexpr std::size_t kEntryInput = 1 << 20;
// Input buffers used in turn: a large file's blocks are written straight out of them while the
// next one is being filled (see Decoder::pin).
constexpr std::size_t kInputBuffers = 2;
static_assert(kEntryInput <= kInputBuffer, "entry reads fill the same buffers");
// Files up to this size are read whole on the fiber and queued for a batch (below).
constexpr std::int64_t kSmallFile = 64 * 1024;
// Entries the fiber decodes per resumption (or fewer, once their small files' data reach the
// byte limit): one stack switch per many entries.
constexpr std::size_t kDecodeEntries = 128;
constexpr std::size_t kDecodeBytes = 4 << 20;
// Small files are written in batches on the offload pool (see write_small_files): up to this many
// files or bytes per batch, and this many batches queued or running at once, one more than the
// pool's two threads so that a thread finishing a batch finds the next one waiting rather than
// waiting for the loop. Chosen by `archivebench --only profile-small` (BENCHMARKS.md, "Small
// files, session 4").
constexpr std::size_t kSmallBatchFiles = 32;
constexpr std::size_t kSmallBatchBytes = 1 << 20;
constexpr std::size_t kBatchesInFlight = 3;
constexpr std::size_t kDirCacheLimit = 512;
// Consecutive directory entries created by one offload job (see Applier::make_dirs).
constexpr std::size_t kDirRunLimit = 256;
constexpr std::uint64_t kResolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;

// One decoded tar entry, owned by the loop side once the fiber hands it over.
struct Entry {
  std::string name;
  std::string hardlink;  // non-empty: a hardlink to this name
  std::string symlink;   // the target of a symlink
  mode_t type = 0;
  mode_t perm = 0;
  std::int64_t uid = 0, gid = 0;
  std::int64_t size = 0;
  timespec atime{}, mtime{};
  dev_t rdev = 0;
  std::vector<std::pair<std::string, std::string>> xattrs;
  std::vector<std::byte> data;  // the whole content of a small regular file
  bool streamed = false;        // a large file: its blocks are pulled afterwards
};

std::string quoted(const std::string& name) {
  std::string out = "'";
  for (char c : name.substr(0, 512)) out += (static_cast<unsigned char>(c) < 0x20) ? '?' : c;
  if (name.size() > 512) out += "...";
  return out + "'";
}

[[noreturn]] void fail(const std::string& name, int err, const std::string& what) {
  throw Error(err, "tar entry " + quoted(name) + ": " + what);
}

// The decoder: libarchive on a fiber. The loop side issues one command at a time with run();
// the fiber executes it and suspends either when it needs input (the loop reads the ByteSource
// and resumes it) or when the command is done.
class Decoder {
 public:
  enum Command { kNextBatch, kNextBlock };

  Decoder() : fiber_(&Decoder::fiber_entry, this) {
    for (auto& buffer : inputs_) buffer = std::make_unique_for_overwrite<std::byte[]>(kInputBuffer);
  }
  ~Decoder() {
    // Unwind a suspended fiber: every further read callback fails, libarchive returns, the
    // fiber frees the archive and ends.
    if (started_) {
      abort_ = true;
      while (!fiber_.finished()) fiber_.resume();
    }
  }
  Decoder(const Decoder&) = delete;
  Decoder& operator=(const Decoder&) = delete;

  core::Task<void> run(Command command, ByteSource& source);

  // Results of the last command.
  std::vector<Entry> batch;
  bool eof = false;
  const void* block = nullptr;
  std::size_t block_size = 0;
  std::int64_t block_offset = 0;
  bool block_end = false;

  void throw_if_error() const {
    if (!error_.empty()) throw Error(error_errno_, error_);
  }

  // Double buffering. libarchive hands out a block of an uncompressed stream as a pointer into
  // the input buffer the read callback returned, and releases that buffer at its next callback.
  // pin() marks the input buffer holding `data` as in use by a write still in flight (-1: the
  // block is libarchive's own memory, valid only until the next decode, and cannot be pinned);
  // run() does not refill a pinned buffer until unpin() released it. So a block is written
  // while the next buffer is read.
  int pin(const void* data, std::size_t size) noexcept {
    auto* p = static_cast<const std::byte*>(data);
    for (std::size_t i = 0; i < kInputBuffers; ++i) {
      const std::byte* begin = inputs_[i].get();
      if (p >= begin && p + size <= begin + kInputBuffer) {
        ++pins_[i];
        return static_cast<int>(i);
      }
    }
    return -1;
  }
  void unpin(int buffer) noexcept {
    if (--pins_[buffer] == 0 && pin_waiter_ && waiting_for_ == buffer)
      core::Loop::current().post(std::exchange(pin_waiter_, {}));
  }

 private:
  static void fiber_entry(void* self) { static_cast<Decoder*>(self)->fiber_main(); }
  static la_ssize_t read_callback(struct archive* a, void* self, const void** buf);
  void fiber_main();
  void execute();
  void decode_batch();
  void decode_block();
  void set_error(const std::string& context);

  struct Unpinned {
    Decoder& self;
    std::size_t buffer;
    bool await_ready() const noexcept { return self.pins_[buffer] == 0; }
    void await_suspend(std::coroutine_handle<> h) noexcept {
      self.pin_waiter_ = h;
      self.waiting_for_ = static_cast<int>(buffer);
    }
    void await_resume() const noexcept {}
  };

  detail::Fiber fiber_;
  struct archive* archive_ = nullptr;
  std::unique_ptr<std::byte[]> inputs_[kInputBuffers];
  std::size_t pins_[kInputBuffers] = {};
  std::size_t current_input_ = 0;  // the buffer libarchive holds
  std::coroutine_handle<> pin_waiter_;
  int waiting_for_ = -1;
  std::size_t input_size_ = 0;
  bool need_input_ = false;
  bool input_end_ = false;
  bool abort_ = false;
  bool started_ = false;
  bool opened_ = false;
  Command command_ = kNextBatch;
  std::string current_;  // the entry being decoded, for messages
  std::string error_;
  int error_errno_ = EINVAL;
};

core::Task<void> Decoder::run(Command command, ByteSource& source) {
  command_ = command;
  error_.clear();
  started_ = true;
  for (;;) {
    fiber_.resume();
    if (!need_input_) break;
    need_input_ = false;
    // libarchive released the buffer it held when it asked for more: fill the next one, once
    // the writes still using it are done.
    const std::size_t next = (current_input_ + 1) % kInputBuffers;
    co_await Unpinned{*this, next};
    current_input_ = next;
    // Entries are read 1 MiB at a time, a large file's data in whole buffers.
    std::size_t want = command == kNextBlock ? kInputBuffer : kEntryInput;
    input_size_ = co_await source.read(std::span<std::byte>(inputs_[next].get(), want));
  }
}

la_ssize_t Decoder::read_callback(struct archive* a, void* self_ptr, const void** buf) {
  auto* self = static_cast<Decoder*>(self_ptr);
  if (!self->abort_ && !self->input_end_) {
    self->need_input_ = true;
    self->fiber_.suspend();
  }
  if (self->abort_) {
    archive_set_error(a, ECANCELED, "input aborted");
    return -1;
  }
  if (self->input_end_ || self->input_size_ == 0) {
    self->input_end_ = true;
    return 0;
  }
  *buf = self->inputs_[self->current_input_].get();
  return static_cast<la_ssize_t>(self->input_size_);
}

void Decoder::fiber_main() {
  archive_ = archive_read_new();
  if (archive_) {
    archive_read_support_filter_all(archive_);
    archive_read_support_format_tar(archive_);
    // A zero-byte stream is an empty layer.
    archive_read_support_format_empty(archive_);
  }
  while (!abort_) {
    // Exceptions must not cross the stack switch: everything is caught here.
    try {
      execute();
    } catch (const std::exception& e) {
      error_ = "tar stream: " + std::string(e.what());
      error_errno_ = ENOMEM;
    }
    fiber_.suspend();
  }
  if (archive_) archive_read_free(archive_);
  archive_ = nullptr;
}

void Decoder::set_error(const std::string& context) {
  const char* msg = archive_ ? archive_error_string(archive_) : nullptr;
  int err = archive_ ? archive_errno(archive_) : ENOMEM;
  // libarchive reports format damage with ARCHIVE_ERRNO_MISC (-1) or EINVAL-like codes.
  error_errno_ = err > 0 ? err : EINVAL;
  if (error_errno_ == ECANCELED && !abort_) error_errno_ = EIO;
  error_ = context + ": " + (msg ? msg : "libarchive failed");
}

void Decoder::execute() {
  if (!archive_) {
    error_ = "tar stream: archive_read_new failed";
    error_errno_ = ENOMEM;
    return;
  }
  if (!opened_) {
    opened_ = true;
    if (archive_read_open(archive_, this, nullptr, &Decoder::read_callback, nullptr) !=
        ARCHIVE_OK) {
      set_error("tar stream: cannot open");
      eof = true;
      return;
    }
  }
  if (command_ == kNextBatch) {
    decode_batch();
  } else {
    decode_block();
  }
}

void Decoder::decode_batch() {
  batch.clear();
  std::size_t bytes = 0;
  while (batch.size() < kDecodeEntries && bytes < kDecodeBytes) {
    struct archive_entry* ae = nullptr;
    int r = archive_read_next_header(archive_, &ae);
    if (r == ARCHIVE_EOF) {
      eof = true;
      return;
    }
    if (r < ARCHIVE_WARN) {
      set_error(current_.empty() ? std::string("tar stream at its first entry")
                                 : "tar stream after entry " + quoted(current_));
      return;
    }
    Entry e;
    const char* name = archive_entry_pathname(ae);
    if (!name) name = archive_entry_pathname_utf8(ae);
    if (!name) {
      set_error("tar stream after entry " + quoted(current_) + ": an entry without a name");
      error_ = "tar stream after entry " + quoted(current_) + ": an entry without a usable name";
      return;
    }
    e.name = name;
    current_ = e.name;
    if (const char* link = archive_entry_hardlink(ae)) e.hardlink = link;
    if (const char* link = archive_entry_symlink(ae)) e.symlink = link;
    e.type = archive_entry_filetype(ae);
    e.perm = archive_entry_perm(ae) & 07777;
    e.uid = archive_entry_uid(ae);
    e.gid = archive_entry_gid(ae);
    e.size = archive_entry_size_is_set(ae) ? archive_entry_size(ae) : 0;
    e.mtime = {archive_entry_mtime(ae), archive_entry_mtime_nsec(ae)};
    e.atime = archive_entry_atime_is_set(ae)
                  ? timespec{archive_entry_atime(ae), archive_entry_atime_nsec(ae)}
                  : e.mtime;
    e.rdev = archive_entry_rdev(ae);
    archive_entry_xattr_reset(ae);
    const char* xname;
    const void* xvalue;
    std::size_t xsize;
    while (archive_entry_xattr_next(ae, &xname, &xvalue, &xsize) == ARCHIVE_OK) {
      e.xattrs.emplace_back(xname, std::string(static_cast<const char*>(xvalue), xsize));
    }
    if (e.size < 0) {
      error_ = "tar entry " + quoted(e.name) + ": negative size";
      error_errno_ = EINVAL;
      return;
    }
    if (e.hardlink.empty() && e.type == AE_IFREG && e.size > 0) {
      if (e.size > kSmallFile) {
        e.streamed = true;
        batch.push_back(std::move(e));
        return;  // the loop streams its blocks before the next batch
      }
      e.data.resize(static_cast<std::size_t>(e.size));
      std::size_t got = 0;
      while (got < e.data.size()) {
        la_ssize_t n = archive_read_data(archive_, e.data.data() + got, e.data.size() - got);
        if (n < 0) {
          set_error("tar entry " + quoted(e.name));
          return;
        }
        if (n == 0) break;
        got += static_cast<std::size_t>(n);
      }
      if (got != e.data.size()) {
        error_ = "tar entry " + quoted(e.name) + ": data shorter than its declared size " +
                 std::to_string(e.size) + " (truncated)";
        error_errno_ = EIO;
        return;
      }
      bytes += got;
    }
    batch.push_back(std::move(e));
  }
}

void Decoder::decode_block() {
  block_end = false;
  la_int64_t offset = 0;
  int r = archive_read_data_block(archive_, &block, &block_size, &offset);
  block_offset = offset;
  if (r == ARCHIVE_EOF) {
    block_end = true;
    return;
  }
  if (r < ARCHIVE_WARN) set_error("tar entry " + quoted(current_));
}

// ---------------------------------------------------------------------------------------------

struct DirHandle {
  sys::UniqueFd fd;
  bool setgid = false;  // new children inherit its group
  gid_t gid = 0;
};
using DirRef = std::shared_ptr<DirHandle>;

// Ownership and mode work decided before the file exists: only what differs from what the kernel
// gives a new file anyway is done (fewer syscalls per entry).
struct Meta {
  bool chown = false;
  uid_t uid = 0;
  gid_t gid = 0;
  bool chmod = false;
  mode_t perm = 0;
  timespec times[2]{};
  std::vector<std::pair<std::string, std::string>> xattrs;
};

mode_t process_umask() {
  static const mode_t value = [] {
    std::string status;
    if (sys::read_small_file(AT_FDCWD, "/proc/self/status", status) >= 0) {
      auto pos = status.find("Umask:");
      if (pos != std::string::npos) return static_cast<mode_t>(std::stoul(status.substr(pos + 6), nullptr, 8));
    }
    return static_cast<mode_t>(022);
  }();
  return value;
}

std::uint32_t map_id(std::int64_t id, const std::vector<IdMapping>& maps, const Entry& e,
                     const char* what) {
  if (id < 0 || id > 0xfffffffeLL) fail(e.name, EINVAL, std::string("absurd ") + what + " " + std::to_string(id));
  if (maps.empty()) return static_cast<std::uint32_t>(id);
  for (const auto& m : maps) {
    if (id >= m.container_id && id < static_cast<std::int64_t>(m.container_id) + m.size)
      return m.host_id + static_cast<std::uint32_t>(id - m.container_id);
  }
  fail(e.name, EINVAL, std::string(what) + " " + std::to_string(id) + " is not mapped");
}

void set_xattrs(int fd, const Meta& m, const std::string& name) {
  for (const auto& [key, value] : m.xattrs) {
    if (::fsetxattr(fd, key.c_str(), value.data(), value.size(), 0) != 0) {
      // As Docker: a filesystem or privilege level without this xattr namespace is not an error.
      if (errno == ENOTSUP || errno == EPERM) continue;
      fail(name, errno, "setting xattr " + key);
    }
  }
}

void set_owner_mode(int fd, const Meta& m, const std::string& name) {
  if (m.chown && ::fchown(fd, m.uid, m.gid) != 0) fail(name, errno, "fchown");
  if (m.chmod && ::fchmod(fd, m.perm) != 0) fail(name, errno, "fchmod");
  set_xattrs(fd, m, name);
}

// A small file waiting in a batch: its data is already decoded, its parent already open.
struct SmallFile {
  DirRef parent;
  std::string base;
  std::string name;  // the entry's name, for messages
  std::vector<std::byte> data;
  Meta meta;
};

// The large-file writes of one file still in flight.
struct BlockWrites {
  std::size_t pending = 0;
  int error = 0;  // the first failure (errno)
  std::coroutine_handle<> waiter;
};

struct AllWritten {
  BlockWrites& writes;
  bool await_ready() const noexcept { return writes.pending == 0; }
  void await_suspend(std::coroutine_handle<> h) noexcept { writes.waiter = h; }
  void await_resume() const noexcept {}
};

// One block of a large file, written from a pinned input buffer. IOSQE_ASYNC: a buffered write
// to a page-cache file would otherwise complete inline in the loop's submit, with no overlap.
core::Task<void> write_block(BlockWrites* writes, Decoder* decoder, int pinned, int fd,
                             const char* data, std::size_t size, std::int64_t offset) {
  while (size > 0 && writes->error == 0) {
    unsigned chunk = static_cast<unsigned>(std::min<std::size_t>(size, 1u << 30));
    int n = co_await core::make_op([=](io_uring_sqe* sqe) {
      io_uring_prep_write(sqe, fd, data, chunk, static_cast<std::uint64_t>(offset));
      sqe->flags |= IOSQE_ASYNC;
    });
    if (n <= 0) {
      writes->error = n < 0 ? -n : EIO;
      break;
    }
    data += n;
    size -= static_cast<std::size_t>(n);
    offset += n;
  }
  decoder->unpin(pinned);
  if (--writes->pending == 0 && writes->waiter) core::Loop::current().post(std::exchange(writes->waiter, {}));
}

class Applier {
 public:
  Applier(ByteSource& source, int root, const ApplyOptions& options)
      : source_(source), root_fd_(root), options_(options),
        scope_([this](std::exception_ptr e) { record(e); }) {}

  core::Task<void> init();
  core::Task<void> apply(Entry& e, Decoder& decoder);
  // Applies the directory entries at the start of `entries` (as many as form a run, see
  // make_dirs) and says how many; 0 when the first entry is not one (then apply() it).
  core::Task<std::size_t> apply_dir_run(std::span<Entry> entries);
  core::Task<void> finish();
  // Waits for every task in flight (after an error too: they use this object).
  core::Task<void> drain() { (void)co_await scope_.join(); }

  ApplyResult result;

  // Task bookkeeping, called by write_batch.
  void record(std::exception_ptr e) noexcept {
    if (!task_error_) task_error_ = e;
  }
  void task_finished() noexcept {
    if (waiter_ && scope_.active() <= wake_below_ + 1) core::Loop::current().post(std::exchange(waiter_, {}));
  }
  [[nodiscard]] mode_t umask() const noexcept { return umask_; }

 private:
  struct WaitBelow {
    Applier& self;
    std::size_t limit;
    bool await_ready() const noexcept { return self.scope_.active() <= limit; }
    void await_suspend(std::coroutine_handle<> h) noexcept {
      self.waiter_ = h;
      self.wake_below_ = limit;
    }
    void await_resume() const noexcept {}
  };
  void throw_task_error() {
    if (task_error_) std::rethrow_exception(task_error_);
  }

  core::Task<DirRef> dir(const std::string& path, const std::string& entry, bool create);
  core::Task<void> flush_batch();
  // Waits until every small file queued so far exists (or failed).
  core::Task<void> settle() {
    co_await flush_batch();
    co_await WaitBelow{*this, 0};
    throw_task_error();
  }
  Meta meta_for(const Entry& e, const DirHandle& parent, bool is_dir) const;
  core::Task<void> apply_file(Entry& e, const Path& p, Decoder& decoder);
  // A directory entry of a run: its parent is open already (`parent`), or is an earlier
  // directory of the same run (then `parent` is that one's handle, filled in by the time it is
  // used). `self` receives the new directory.
  struct NewDir {
    const Entry* entry;
    Path path;
    DirRef parent;
    DirRef self;
    timespec times[2]{};
  };
  core::Task<void> make_dirs(std::vector<NewDir> run);
  void make_dirs_blocking(std::vector<NewDir>& run) const;
  core::Task<void> apply_symlink(Entry& e, const Path& p);
  core::Task<void> apply_hardlink(Entry& e, const Path& p);
  core::Task<void> apply_node(Entry& e, const Path& p);

  ByteSource& source_;
  int root_fd_;
  const ApplyOptions& options_;
  core::Scope scope_;
  std::exception_ptr task_error_;
  std::coroutine_handle<> waiter_;
  std::size_t wake_below_ = 0;
  DirRef root_;
  std::vector<SmallFile> batch_;
  std::size_t batch_bytes_ = 0;
  std::unordered_map<std::string, DirRef> dirs_;
  struct DirTimes {
    std::string path;
    std::string entry;
    timespec times[2];
  };
  std::vector<DirTimes> dir_times_;
  std::uint64_t entries_seen_ = 0;
  std::uint64_t bytes_declared_ = 0;
  mode_t umask_ = 022;
  uid_t euid_ = 0;
  gid_t egid_ = 0;
};

// Runs on the offload pool: plain blocking syscalls, one file after another. The first failure
// throws, naming the entry; the rest of the batch is left unwritten (the apply fails anyway).
//
// Why not the ring: creating a file (O_CREAT) and a buffered write to tmpfs or ext4 both always
// leave the submitting thread for an io-wq worker, and with DEFER_TASKRUN every step of a linked
// chain comes back through the loop, so each file crossed between the cores twice; those
// hand-offs, not the syscalls, capped the apply at about 1.45x GNU tar. One hand-off per batch
// of 32 files gives 1.65-1.75x on tmpfs and 1.8-1.9x on ext4 (BENCHMARKS.md, "Small files,
// session 4").
void write_small_files(std::vector<SmallFile>& files, mode_t umask) {
  for (SmallFile& f : files) {
    int fd = sys::openat2(f.parent->fd.get(), f.base.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW,
                          f.meta.perm & ~umask & 07777, kResolve);
    if (fd == -EEXIST) fail(f.name, EEXIST, "already exists (duplicate entry)");
    if (fd < 0) fail(f.name, -fd, "creating the file");
    sys::UniqueFd file(fd);
    set_owner_mode(file.get(), f.meta, f.name);
    // A short write (a filesystem filling up) is followed by another, which then says why.
    for (std::size_t done = 0; done < f.data.size();) {
      ssize_t r = ::pwrite(file.get(), f.data.data() + done, f.data.size() - done, static_cast<off_t>(done));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) fail(f.name, errno, "writing the data");
      if (r == 0) fail(f.name, EIO, "writing the data: no progress");
      done += static_cast<std::size_t>(r);
    }
    // After the data: a write updates mtime.
    if (::futimens(file.get(), f.meta.times) != 0) fail(f.name, errno, "futimens");
    if (::close(file.release()) != 0 && errno != EINTR) fail(f.name, errno, "close");
  }
}

core::Task<void> write_batch(Applier* self, std::vector<SmallFile> files) {
  try {
    const mode_t umask = self->umask();
    co_await core::offload([&files, umask] { write_small_files(files, umask); });
  } catch (...) {
    self->record(std::current_exception());
  }
  self->task_finished();
}

core::Task<void> Applier::init() {
  umask_ = process_umask();
  euid_ = ::geteuid();
  egid_ = ::getegid();
  struct statx stx{};
  int r = co_await core::statx(root_fd_, "", AT_EMPTY_PATH, STATX_MODE | STATX_GID, &stx);
  if (r < 0) throw Error(-r, "statx of the apply target");
  if (!S_ISDIR(stx.stx_mode)) throw Error(ENOTDIR, "apply target is not a directory");
  root_ = std::make_shared<DirHandle>();
  open_how how{};
  how.flags = O_RDONLY | O_DIRECTORY;
  how.resolve = kResolve;
  int fd = co_await core::openat2(root_fd_, ".", &how);
  if (fd < 0) throw Error(-fd, "opening the apply target");
  root_->fd.reset(fd);
  root_->setgid = stx.stx_mode & S_ISGID;
  root_->gid = stx.stx_gid;
}

core::Task<DirRef> Applier::dir(const std::string& path, const std::string& entry, bool create) {
  if (path.empty()) co_return root_;
  if (auto it = dirs_.find(path); it != dirs_.end()) co_return it->second;
  open_how how{};
  how.flags = O_RDONLY | O_DIRECTORY;
  how.resolve = kResolve;
  int fd = co_await core::openat2(root_fd_, path.c_str(), &how);
  if (fd == -ENOENT && create && (scope_.active() > 0 || !batch_.empty())) {
    // A small file still queued may own this name ("f", then "f/g"): let it be created and
    // look again, so that the error names "f/g" (its parent is not a directory) rather than
    // depending on which of mkdir and the batch came first.
    co_await settle();
    fd = co_await core::openat2(root_fd_, path.c_str(), &how);
  }
  if (fd == -ENOENT && create) {
    // A parent the tar does not list (Docker creates it 0755, owned by the mapped root).
    auto slash = path.rfind('/');
    std::string up = slash == std::string::npos ? std::string() : path.substr(0, slash);
    std::string base = slash == std::string::npos ? path : path.substr(slash + 1);
    DirRef parent = co_await dir(up, entry, true);
    int r = co_await core::mkdirat(parent->fd.get(), base.c_str(), 0755);
    if (r < 0 && r != -EEXIST) fail(entry, -r, "creating its parent " + quoted(path));
    fd = co_await core::openat2(root_fd_, path.c_str(), &how);
    if (fd >= 0 && r == 0) {
      Entry root_owner;
      root_owner.name = entry;
      uid_t uid = map_id(0, options_.uid_maps, root_owner, "uid");
      gid_t gid = map_id(0, options_.gid_maps, root_owner, "gid");
      gid_t default_gid = parent->setgid ? parent->gid : egid_;
      if ((uid != euid_ || gid != default_gid) && ::fchown(fd, uid, gid) != 0) {
        int err = errno;
        (void)::close(fd);
        fail(entry, err, "chown of its parent " + quoted(path));
      }
    }
  }
  if (fd == -ELOOP) fail(entry, ELOOP, "its parent " + quoted(path) + " is a symlink: refusing to follow it");
  if (fd == -ENOTDIR) fail(entry, ENOTDIR, "its parent " + quoted(path) + " is not a directory");
  if (fd == -EXDEV) fail(entry, EXDEV, "its parent " + quoted(path) + " escapes the layer");
  if (fd < 0) fail(entry, -fd, "opening " + quoted(path));
  auto handle = std::make_shared<DirHandle>();
  handle->fd.reset(fd);
  // fstat of a descriptor just opened reads the in-memory inode: no disk, no wait (a ring statx
  // always goes to an io-wq worker, a round trip per directory; with it a 20,000-directory
  // layer applied 6x slower than GNU tar).
  struct stat st{};
  if (::fstat(fd, &st) != 0) fail(entry, errno, "fstat of " + quoted(path));
  handle->setgid = st.st_mode & S_ISGID;
  handle->gid = st.st_gid;
  // Bounded: tasks in flight keep their parents alive through their own references.
  if (dirs_.size() >= kDirCacheLimit) dirs_.clear();
  dirs_.emplace(path, handle);
  co_return handle;
}

Meta Applier::meta_for(const Entry& e, const DirHandle& parent, bool is_dir) const {
  Meta m;
  m.uid = map_id(e.uid, options_.uid_maps, e, "uid");
  m.gid = map_id(e.gid, options_.gid_maps, e, "gid");
  gid_t default_gid = parent.setgid ? parent.gid : egid_;
  m.chown = m.uid != euid_ || m.gid != default_gid;
  m.perm = e.perm;
  // The kernel applies the umask at creation, may keep or drop set-id bits, and a chown clears
  // them: chmod only in those cases.
  m.chmod = (e.perm & ~umask_) != e.perm || (e.perm & 07000) != 0 || (is_dir && parent.setgid);
  m.times[0] = e.atime;
  m.times[1] = e.mtime;
  m.xattrs = e.xattrs;
  return m;
}

core::Task<void> Applier::apply(Entry& e, Decoder& decoder) {
  throw_task_error();
  if (++entries_seen_ > options_.max_entries)
    fail(e.name, E2BIG, "more entries than the limit of " + std::to_string(options_.max_entries));
  Path p = clean_path(e.name, options_.max_name_length, e.name);
  if (p.rel.empty()) {
    // The root itself ("./" or "/"): Docker skips it; the staging directory stays as created.
    if (e.type == AE_IFDIR && e.hardlink.empty()) co_return;
    fail(e.name, EINVAL, "a non-directory entry naming the layer root");
  }
  if (!e.hardlink.empty()) {
    co_await apply_hardlink(e, p);
  } else {
    // Directories come through apply_dir_run, which takes every one that gets this far.
    switch (e.type) {
      case AE_IFREG: co_await apply_file(e, p, decoder); break;
      case AE_IFLNK: co_await apply_symlink(e, p); break;
      case AE_IFCHR:
      case AE_IFBLK:
      case AE_IFIFO: co_await apply_node(e, p); break;
      default: fail(e.name, EINVAL, "unsupported entry type " + std::to_string(e.type));
    }
  }
}

core::Task<void> Applier::apply_file(Entry& e, const Path& p, Decoder& decoder) {
  if (static_cast<std::uint64_t>(e.size) > options_.max_bytes - std::min(bytes_declared_, options_.max_bytes))
    fail(e.name, EFBIG, "more data than the limit of " + std::to_string(options_.max_bytes) + " bytes");
  bytes_declared_ += static_cast<std::uint64_t>(e.size);
  DirRef parent = co_await dir(p.parent, e.name, true);
  Meta m = meta_for(e, *parent, false);
  result.entries++;
  result.bytes_applied += static_cast<std::uint64_t>(e.size);
  if (!e.streamed) {
    batch_bytes_ += e.data.size();
    batch_.push_back(SmallFile{std::move(parent), p.base, e.name, std::move(e.data), std::move(m)});
    if (batch_.size() >= kSmallBatchFiles || batch_bytes_ >= kSmallBatchBytes) co_await flush_batch();
    co_return;
  }
  // A large file: written here, block by block, straight from libarchive's buffer (the fiber
  // does not run again until the write is done, so the block stays valid).
  open_how how{};
  how.flags = O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW;
  how.mode = m.perm & ~umask_ & 07777;
  how.resolve = kResolve;
  int fd = co_await core::openat2(parent->fd.get(), p.base.c_str(), &how);
  if (fd == -EEXIST) fail(e.name, EEXIST, "already exists (duplicate entry)");
  if (fd < 0) fail(e.name, -fd, "creating the file");
  sys::UniqueFd file(fd);
  // A stream that breaks off inside this file leaves no half-written file behind.
  struct RemoveUnlessDone {
    int parent;
    const char* base;
    bool done = false;
    ~RemoveUnlessDone() {
      if (!done) (void)::unlinkat(parent, base, 0);
    }
  } cleanup{parent->fd.get(), p.base.c_str()};
  set_owner_mode(file.get(), m, e.name);
  BlockWrites writes;
  std::exception_ptr failure;
  std::int64_t end = 0;
  try {
    for (;;) {
      co_await decoder.run(Decoder::kNextBlock, source_);
      decoder.throw_if_error();
      if (decoder.block_end) break;
      auto* data = static_cast<const char*>(decoder.block);
      std::size_t size = decoder.block_size;
      std::int64_t offset = decoder.block_offset;
      if (offset < 0 || offset + static_cast<std::int64_t>(size) > e.size)
        fail(e.name, EINVAL, "data beyond its declared size");
      if (writes.error != 0) fail(e.name, writes.error, "writing the data");
      end = std::max(end, offset + static_cast<std::int64_t>(size));
      if (size == 0) continue;
      int pinned = decoder.pin(data, size);
      if (pinned >= 0) {
        // The block lives in an input buffer that stays untouched until this write is done:
        // write it on an io-wq worker while the loop reads and decodes the next buffer. One
        // write at a time: io-wq does not serialise them, and a second worker would spin on the
        // file's inode lock, burning the core the next read needs.
        co_await AllWritten{writes};
        if (writes.error != 0) fail(e.name, writes.error, "writing the data");
        ++writes.pending;
        scope_.spawn(write_block(&writes, &decoder, pinned, file.get(), data, size, offset));
        continue;
      }
      // libarchive's own memory (a decompressed stream): valid only until the next decode.
      while (size > 0) {
        unsigned chunk = static_cast<unsigned>(std::min<std::size_t>(size, 1u << 30));
        int n = co_await core::write(file.get(), data, chunk, static_cast<std::uint64_t>(offset));
        if (n < 0) fail(e.name, -n, "writing the data");
        if (n == 0) fail(e.name, EIO, "short write");
        data += n;
        size -= static_cast<std::size_t>(n);
        offset += n;
      }
    }
  } catch (...) {
    failure = std::current_exception();
  }
  // Every write in flight uses the fd and an input buffer: both must outlive it.
  co_await AllWritten{writes};
  if (failure) std::rethrow_exception(failure);
  if (writes.error != 0) fail(e.name, writes.error, "writing the data");
  // A sparse file ending in a hole.
  if (end < e.size && ::ftruncate(file.get(), e.size) != 0) fail(e.name, errno, "ftruncate");
  if (::futimens(file.get(), m.times) != 0) fail(e.name, errno, "futimens");
  cleanup.done = true;
  int r = co_await core::close(file.release());
  if (r < 0) fail(e.name, -r, "close");
}

core::Task<std::size_t> Applier::apply_dir_run(std::span<Entry> entries) {
  throw_task_error();
  std::vector<NewDir> run;
  std::unordered_map<std::string, DirRef> in_run;
  for (Entry& e : entries) {
    // The run ends before an entry that is not a plain directory, or that apply() must refuse
    // (its error then names it, after the run before it was applied).
    if (e.type != AE_IFDIR || !e.hardlink.empty() || run.size() >= kDirRunLimit) break;
    if (entries_seen_ + 1 > options_.max_entries) break;
    Path p;
    try {
      p = clean_path(e.name, options_.max_name_length, e.name);
    } catch (const Error&) {
      break;
    }
    if (p.rel.empty()) break;
    DirRef parent;
    if (auto it = in_run.find(p.parent); it != in_run.end()) {
      parent = it->second;
    } else {
      // A parent below a directory of this run that the run does not list: it is created
      // implicitly (dir()) once the run exists.
      bool below_run = false;
      for (auto slash = p.parent.rfind('/'); slash != std::string::npos && !below_run;
           slash = slash == 0 ? std::string::npos : p.parent.rfind('/', slash - 1))
        below_run = in_run.count(p.parent.substr(0, slash)) != 0;
      if (below_run) break;
      parent = co_await dir(p.parent, e.name, true);
    }
    ++entries_seen_;
    auto self = std::make_shared<DirHandle>();
    in_run[p.rel] = self;
    run.push_back(NewDir{&e, std::move(p), std::move(parent), std::move(self)});
  }
  const std::size_t count = run.size();
  if (count > 0) co_await make_dirs(std::move(run));
  co_return count;
}

// Runs on the offload pool: the run's directories in order, each created, opened (which checks
// that what is there is a directory and not a symlink: a duplicate entry), owned and moded.
// Throws for the first that fails, naming it.
void Applier::make_dirs_blocking(std::vector<NewDir>& run) const {
  for (NewDir& d : run) {
    const std::string& name = d.entry->name;
    Meta m = meta_for(*d.entry, *d.parent, true);
    bool existed = false;
    if (::mkdirat(d.parent->fd.get(), d.path.base.c_str(), m.perm & 0777) != 0) {
      if (errno != EEXIST) fail(name, errno, "mkdir");
      existed = true;
    }
    int fd = sys::openat2(d.parent->fd.get(), d.path.base.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW, 0, kResolve);
    if (fd < 0 && existed) fail(name, EEXIST, "already exists and is not a directory (duplicate entry)");
    if (fd < 0) fail(name, -fd, "opening the new directory");
    d.self->fd.reset(fd);
    struct stat st{};
    if (::fstat(fd, &st) != 0) fail(name, errno, "fstat");
    d.self->setgid = st.st_mode & S_ISGID;
    d.self->gid = st.st_gid;
    // An implicit parent created earlier gets this entry's owner and mode now.
    if (existed) m.chmod = true, m.chown = true;
    set_owner_mode(fd, m, name);
    if (existed || m.chmod) {
      // Children inherit the set-gid bit and group from the final state.
      d.self->setgid = m.perm & S_ISGID;
      if (m.chown) d.self->gid = m.gid;
    }
    d.times[0] = m.times[0];
    d.times[1] = m.times[1];
  }
}

// A run of directories is one offload job: creating a directory always leaves the submitting
// thread (io_uring runs mkdirat on an io-wq worker), and one round trip per directory made a
// layer of 20,000 directories apply at 0.39x GNU tar (BENCHMARKS.md, "Directories and Diff of
// many small files, session 4").
core::Task<void> Applier::make_dirs(std::vector<NewDir> run) {
  co_await core::offload([this, &run] { make_dirs_blocking(run); });
  for (NewDir& d : run) {
    if (dirs_.size() >= kDirCacheLimit) dirs_.clear();
    dirs_[d.path.rel] = d.self;
    // A directory's times are set last: creating its children changes its mtime.
    dir_times_.push_back(DirTimes{d.path.rel, d.entry->name, {d.times[0], d.times[1]}});
    result.entries++;
  }
}

core::Task<void> Applier::apply_symlink(Entry& e, const Path& p) {
  if (e.symlink.empty()) fail(e.name, EINVAL, "a symlink with an empty target");
  if (e.symlink.size() > options_.max_name_length) fail(e.name, ENAMETOOLONG, "symlink target too long");
  DirRef parent = co_await dir(p.parent, e.name, true);
  Meta m = meta_for(e, *parent, false);
  int r = co_await core::symlinkat(e.symlink.c_str(), parent->fd.get(), p.base.c_str());
  if (r == -EEXIST) fail(e.name, EEXIST, "already exists (duplicate entry)");
  if (r < 0) fail(e.name, -r, "symlink");
  if (m.chown && ::fchownat(parent->fd.get(), p.base.c_str(), m.uid, m.gid, AT_SYMLINK_NOFOLLOW) != 0)
    fail(e.name, errno, "lchown");
  if (::utimensat(parent->fd.get(), p.base.c_str(), m.times, AT_SYMLINK_NOFOLLOW) != 0)
    fail(e.name, errno, "utimensat");
  result.entries++;
  result.bytes_applied += e.symlink.size();
}

core::Task<void> Applier::apply_hardlink(Entry& e, const Path& p) {
  Path target = clean_path(e.hardlink, options_.max_name_length, e.name);
  if (target.rel.empty()) fail(e.name, EINVAL, "a hardlink to the layer root");
  DirRef target_parent;
  try {
    target_parent = co_await dir(target.parent, e.name, false);
  } catch (const Error& err) {
    if (err.errno_value() == ENOENT)
      fail(e.name, ENOENT, "hardlink target " + quoted(e.hardlink) + " does not exist");
    throw;
  }
  DirRef parent = co_await dir(p.parent, e.name, true);
  // The target may be a small file still queued: let every queued file be created first.
  co_await settle();
  int r = co_await core::linkat(target_parent->fd.get(), target.base.c_str(), parent->fd.get(),
                                p.base.c_str(), 0);
  if (r == -ENOENT) fail(e.name, ENOENT, "hardlink target " + quoted(e.hardlink) + " does not exist");
  if (r == -EEXIST) fail(e.name, EEXIST, "already exists (duplicate entry)");
  if (r == -EPERM) fail(e.name, EPERM, "hardlink target " + quoted(e.hardlink) + " is a directory");
  if (r < 0) fail(e.name, -r, "link to " + quoted(e.hardlink));
  result.entries++;
}

core::Task<void> Applier::apply_node(Entry& e, const Path& p) {
  bool device = e.type != AE_IFIFO;
  if (device && !options_.allow_device_nodes) co_return;
  DirRef parent = co_await dir(p.parent, e.name, true);
  Meta m = meta_for(e, *parent, false);
  int parent_fd = parent->fd.get();
  const char* base = p.base.c_str();
  mode_t mode = e.type | (m.perm & 0777);
  dev_t rdev = device ? e.rdev : 0;
  // The ring has no mknod: it runs on the offload pool.
  int r = co_await core::offload([parent_fd, base, mode, rdev] {
    return ::mknodat(parent_fd, base, mode, rdev) == 0 ? 0 : -errno;
  });
  if (r == -EEXIST) fail(e.name, EEXIST, "already exists (duplicate entry)");
  if (r == -EPERM && device)
    fail(e.name, EPERM, "creating a device node needs CAP_MKNOD (refused)");
  if (r < 0) fail(e.name, -r, "mknod");
  if (m.chown && ::fchownat(parent_fd, base, m.uid, m.gid, AT_SYMLINK_NOFOLLOW) != 0)
    fail(e.name, errno, "lchown");
  // The node was created by us just now under a parent nothing else writes to: not a symlink.
  if (m.chmod && ::fchmodat(parent_fd, base, m.perm, 0) != 0) fail(e.name, errno, "chmod");
  if (::utimensat(parent_fd, base, m.times, AT_SYMLINK_NOFOLLOW) != 0) fail(e.name, errno, "utimensat");
  result.entries++;
}

core::Task<void> Applier::flush_batch() {
  if (batch_.empty()) co_return;
  co_await WaitBelow{*this, kBatchesInFlight - 1};
  throw_task_error();
  scope_.spawn(write_batch(this, std::exchange(batch_, {})));
  batch_bytes_ = 0;
}

core::Task<void> Applier::finish() {
  co_await settle();
  // In the tar's order, as Docker does: of a directory listed twice, the later entry's times
  // win, like its mode and owner.
  for (const DirTimes& t : dir_times_) {
    DirRef d = co_await dir(t.path, t.entry, false);
    if (::futimens(d->fd.get(), t.times) != 0) fail(t.entry, errno, "futimens");
  }
  dirs_.clear();
}

}  // namespace

core::Task<ApplyResult> apply_tar(ByteSource& tar, int target_dirfd, const ApplyOptions& options) {
  Applier applier(tar, target_dirfd, options);
  Decoder decoder;
  std::exception_ptr failure;
  try {
    co_await applier.init();
    for (;;) {
      co_await decoder.run(Decoder::kNextBatch, tar);
      // Entries decoded before an error are applied first, so the error names the bad entry.
      std::span<Entry> entries(decoder.batch);
      for (std::size_t i = 0; i < entries.size();) {
        std::size_t done = co_await applier.apply_dir_run(entries.subspan(i));
        if (done == 0) {
          co_await applier.apply(entries[i], decoder);
          done = 1;
        }
        i += done;
      }
      decoder.throw_if_error();
      if (decoder.eof) break;
    }
    co_await applier.finish();
  } catch (...) {
    failure = std::current_exception();
  }
  if (failure) {
    co_await applier.drain();
    std::rethrow_exception(failure);
  }
  co_return applier.result;
}

}  // namespace layerd::archive
