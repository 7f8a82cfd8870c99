// libFuzzer harness for apply_tar: arbitrary bytes (plain, or through any decompressor libarchive
// detects) are applied into an empty directory inside a sandbox directory. Whatever the outcome
// (applied or refused), nothing may appear, change or vanish outside the target: the sandbox
// holds the target, a sentinel file and a sentinel directory, and is checked after every input.
//
// Build and run: see tests/fuzz/README.md.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "layerd/archive/archive.hpp"
#include "layerd/core/loop.hpp"
#include "layerd/sys/error.hpp"

namespace fs = std::filesystem;
using namespace layerd;

namespace {

class BytesSource final : public archive::ByteSource {
 public:
  BytesSource(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {}
  core::Task<std::size_t> read(std::span<std::byte> buf) override {
    // Small, uneven chunks: exercises libarchive's buffer boundaries and the fiber switches.
    std::size_t n = std::min({buf.size(), size_ - pos_, std::size_t{4093}});
    if (n > 0) std::memcpy(buf.data(), data_ + pos_, n);
    pos_ += n;
    co_return n;
  }

 private:
  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t pos_ = 0;
};

// Everything in the sandbox outside the target: path, type, size, mode, mtime.
std::vector<std::string> outside_state(const std::string& sandbox) {
  std::vector<std::string> out;
  for (auto it = fs::recursive_directory_iterator(sandbox); it != fs::recursive_directory_iterator(); ++it) {
    if (it->path().filename() == "target") {
      it.disable_recursion_pending();
      continue;
    }
    struct stat st {};
    ::lstat(it->path().c_str(), &st);
    out.push_back(it->path().string() + " " + std::to_string(st.st_mode) + " " + std::to_string(st.st_size) +
                  " " + std::to_string(st.st_mtim.tv_sec) + "." + std::to_string(st.st_mtim.tv_nsec));
  }
  std::sort(out.begin(), out.end());
  return out;
}

struct Sandbox {
  std::string root;
  std::string target;
  std::vector<std::string> baseline;
  std::unique_ptr<core::Loop> loop;

  Sandbox() {
    char pattern[] = "/tmp/layerd-apply-fuzz-XXXXXX";
    if (!::mkdtemp(pattern)) std::abort();
    root = pattern;
    target = root + "/target";
    fs::create_directories(root + "/sentinel-dir");
    std::FILE* f = std::fopen((root + "/sentinel").c_str(), "w");
    std::fputs("sentinel\n", f);
    std::fclose(f);
    baseline = outside_state(root);
    loop = std::make_unique<core::Loop>();
  }
  ~Sandbox() {
    std::error_code ec;
    fs::remove_all(root, ec);
  }
};

Sandbox& sandbox() {
  static Sandbox box;
  return box;
}

core::Task<void> apply_once(const std::uint8_t* data, std::size_t size, int target_fd) {
  BytesSource source(data, size);
  archive::ApplyOptions options;
  // Small limits so the fuzzer reaches them, and no device nodes (the harness may run as root).
  options.max_entries = 1000;
  options.max_bytes = 16 << 20;
  options.max_name_length = 1024;
  options.allow_device_nodes = false;
  try {
    (void)co_await archive::apply_tar(source, target_fd, options);
  } catch (const Error&) {
    // Refusing the input is a fine outcome; what it left inside the target does not matter
    // here (the driver discards the staging directory).
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Sandbox& box = sandbox();
  std::error_code ec;
  fs::remove_all(box.target, ec);
  if (::mkdir(box.target.c_str(), 0755) != 0) std::abort();
  int fd = ::open(box.target.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) std::abort();
  box.loop->block_on(apply_once(data, size, fd));
  ::close(fd);
  if (outside_state(box.root) != box.baseline) {
    std::fprintf(stderr, "apply_tar changed something outside its target\n");
    std::abort();
  }
  // Nothing escaping by an absolute name either (the names the fuzzer likes best).
  struct stat st {};
  if (::lstat("/tmp/target", &st) == 0 || ::lstat("/sentinel", &st) == 0) std::abort();
  return 0;
}
