#include <fcntl.h>

#include <algorithm>
#include <charconv>
#include <exception>

#include "layerd/core/loop.hpp"
#include "layerd/core/ops.hpp"
#include "layerd/sys/error.hpp"
#include "layerd/watch/watch.hpp"

namespace layerd::watch {

namespace {

constexpr const char* kMountInfo = "/proc/self/mountinfo";
constexpr unsigned kReadChunk = 256 * 1024;
// A mount table larger than this is a runaway (a mount leak of tens of thousands of entries);
// refusing it keeps one refresh from eating the daemon's memory.
constexpr std::size_t kMaxMountInfo = 64u << 20;

bool is_octal(char c) { return c >= '0' && c <= '7'; }

bool parse_int(std::string_view s, int& out) {
  auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  return ec == std::errc() && ptr == s.data() + s.size();
}

// Splits on single spaces, keeping empty fields: an empty mount source shows as two spaces.
std::vector<std::string_view> split_fields(std::string_view line) {
  std::vector<std::string_view> out;
  std::size_t pos = 0;
  for (;;) {
    std::size_t next = line.find(' ', pos);
    if (next == std::string_view::npos) {
      out.push_back(line.substr(pos));
      return out;
    }
    out.push_back(line.substr(pos, next - pos));
    pos = next + 1;
  }
}

bool parse_line(std::string_view line, MountEntry& e) {
  auto f = split_fields(line);
  // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS
  if (f.size() < 10) return false;
  if (!parse_int(f[0], e.mount_id) || !parse_int(f[1], e.parent_id)) return false;
  e.device = std::string(f[2]);
  e.root = decode_mountinfo_escapes(f[3]);
  e.mount_point = decode_mountinfo_escapes(f[4]);
  e.options = decode_mountinfo_escapes(f[5]);
  std::size_t i = 6;
  e.optional_fields.clear();
  while (i < f.size() && f[i] != "-") e.optional_fields.push_back(std::string(f[i++]));
  if (i + 3 >= f.size()) return false;  // "-" then three fields
  e.fstype = decode_mountinfo_escapes(f[i + 1]);
  e.source = decode_mountinfo_escapes(f[i + 2]);
  // Super options are the rest (they contain no unescaped spaces, but be lenient).
  std::string super;
  for (std::size_t k = i + 3; k < f.size(); ++k) {
    if (k > i + 3) super.push_back(' ');
    super.append(f[k]);
  }
  e.super_options = decode_mountinfo_escapes(super);
  return true;
}

}  // namespace

std::string decode_mountinfo_escapes(std::string_view field) {
  std::string out;
  out.reserve(field.size());
  for (std::size_t i = 0; i < field.size(); ++i) {
    if (field[i] == '\\' && i + 3 < field.size() && is_octal(field[i + 1]) &&
        is_octal(field[i + 2]) && is_octal(field[i + 3])) {
      int v = (field[i + 1] - '0') * 64 + (field[i + 2] - '0') * 8 + (field[i + 3] - '0');
      if (v <= 0xff) {
        out.push_back(static_cast<char>(v));
        i += 3;
        continue;
      }
    }
    out.push_back(field[i]);
  }
  return out;
}

std::vector<MountEntry> parse_mountinfo(std::string_view text) {
  std::vector<MountEntry> out;
  std::size_t pos = 0;
  while (pos < text.size()) {
    std::size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = text.substr(pos, end - pos);
    pos = end + 1;
    if (line.empty()) continue;
    MountEntry e;
    if (parse_line(line, e)) out.push_back(std::move(e));
  }
  return out;
}

const MountEntry* MountTable::find(std::string_view mount_point) const {
  for (auto it = entries_.rbegin(); it != entries_.rend(); ++it)
    if (it->mount_point == mount_point) return &*it;
  return nullptr;
}

std::vector<const MountEntry*> MountTable::under(std::string_view prefix) const {
  while (prefix.size() > 1 && prefix.back() == '/') prefix.remove_suffix(1);
  std::vector<const MountEntry*> out;
  for (const auto& e : entries_) {
    std::string_view mp = e.mount_point;
    bool below = prefix == "/" ? mp.size() > 1 && mp[0] == '/'
                               : mp.size() > prefix.size() + 1 && mp.starts_with(prefix) &&
                                     mp[prefix.size()] == '/';
    if (below) out.push_back(&e);
  }
  return out;
}

void MountTable::assign(std::vector<MountEntry> entries) {
  if (entries != entries_) {
    entries_ = std::move(entries);
    ++generation_;
  }
}

struct MountTable::RoundAwaiter {
  MountTable* table;
  bool await_ready() const noexcept { return false; }
  void await_suspend(std::coroutine_handle<> h) { table->refresh_waiters_.push_back(h); }
  void await_resume() const noexcept {}
};

core::Task<void> MountTable::refresh() {
  const std::uint64_t ticket = ++requested_;
  while (covered_ < ticket) {
    if (reading_) {
      // Someone is reading: wait for that round to end, then see whether it covered us (it
      // did not if it started before our call) and read again if not.
      co_await RoundAwaiter{this};
      continue;
    }
    reading_ = true;
    const std::uint64_t covers = requested_;
    std::exception_ptr failure;
    try {
      co_await read_once();
    } catch (...) {
      failure = std::current_exception();
    }
    reading_ = false;
    if (!failure) covered_ = std::max(covered_, covers);
    auto waiters = std::move(refresh_waiters_);
    refresh_waiters_.clear();
    for (auto h : waiters) core::Loop::current().post(h);
    if (failure) std::rethrow_exception(failure);
  }
}

core::Task<void> MountTable::read_once() {
  if (!fd_) {
    int fd = co_await core::openat(AT_FDCWD, kMountInfo, O_RDONLY);
    if (fd < 0) throw Error(fd, std::string("opening ") + kMountInfo);
    fd_.reset(fd);
  }
  // Reading from offset 0 makes the seq_file start over: one fd serves every refresh.
  std::string text;
  std::vector<char> buf(kReadChunk);
  for (;;) {
    // IOSQE_ASYNC: on an io-wq worker. Issued inline, the kernel generates the text in the
    // loop's thread (a seq_file ignores "no wait") and waits there for the mount namespace's
    // lock, which every mount and unmount of a storm takes: tens of milliseconds stolen from
    // every other client.
    int n = co_await core::make_op([&, offset = text.size()](io_uring_sqe* sqe) {
      io_uring_prep_read(sqe, fd_.get(), buf.data(), kReadChunk, offset);
      sqe->flags |= IOSQE_ASYNC;
    });
    if (n < 0) throw Error(n, std::string("reading ") + kMountInfo);
    if (n == 0) break;
    if (text.size() + static_cast<std::size_t>(n) > kMaxMountInfo)
      throw Error(EFBIG, std::string(kMountInfo) + " is larger than 64 MiB");
    text.append(buf.data(), static_cast<std::size_t>(n));
  }
  // Parsing a table of thousands of mounts takes long enough to delay other clients in a mount
  // storm (one parse per change): done on a worker; the loop only takes the result.
  std::vector<MountEntry> entries =
      co_await core::offload([&text] { return parse_mountinfo(text); });
  assign(std::move(entries));
}

}  // namespace layerd::watch
