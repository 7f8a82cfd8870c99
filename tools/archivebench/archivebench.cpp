// archivebench: layerd's apply_tar against GNU tar, bsdtar and cat, same filesystem, same run,
// alternating rounds; medians with min and max.
//
//   archivebench [--dir /dev/shm/archivebench] [--rounds 5] [--files 20000] [--big-mib 1024]
#include <archive.h>
#include <archive_entry.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "layerd/archive/archive.hpp"
#include "layerd/core/loop.hpp"
#include "layerd/core/ops.hpp"
#include "layerd/sys/error.hpp"
#include "layerd/sys/fd.hpp"

using namespace layerd;

namespace {

// Reads the tar file with ring reads, as the socket would deliver it.
class FileSource final : public layerd::archive::ByteSource {
 public:
  explicit FileSource(const std::string& path) : fd_(::open(path.c_str(), O_RDONLY | O_CLOEXEC)) {
    if (!fd_) throw Error(errno, "open " + path);
  }
  core::Task<std::size_t> read(std::span<std::byte> buf) override {
    int n = co_await core::read(fd_.get(), buf.data(), static_cast<unsigned>(buf.size()), offset_);
    if (n < 0) throw Error(-n, "read");
    offset_ += static_cast<std::uint64_t>(n);
    co_return static_cast<std::size_t>(n);
  }

 private:
  sys::UniqueFd fd_;
  std::uint64_t offset_ = 0;
};

void write_tar(const std::string& path, int files, std::size_t file_size, int per_dir) {
  struct archive* a = archive_write_new();
  archive_write_set_format_pax_restricted(a);
  archive_write_open_filename(a, path.c_str());
  std::string data(file_size, 'd');
  std::vector<char> chunk(1 << 20, 'b');
  struct archive_entry* e = archive_entry_new();
  for (int i = 0; i < files; ++i) {
    if (i % per_dir == 0) {
      archive_entry_clear(e);
      archive_entry_set_pathname(e, ("d" + std::to_string(i / per_dir) + "/").c_str());
      archive_entry_set_filetype(e, AE_IFDIR);
      archive_entry_set_perm(e, 0755);
      archive_entry_set_mtime(e, 1'600'000'000, 0);
      archive_write_header(a, e);
    }
    archive_entry_clear(e);
    archive_entry_set_pathname(e, ("d" + std::to_string(i / per_dir) + "/f" + std::to_string(i)).c_str());
    archive_entry_set_filetype(e, AE_IFREG);
    archive_entry_set_perm(e, 0644);
    archive_entry_set_mtime(e, 1'600'000'000, 0);
    archive_entry_set_size(e, static_cast<la_int64_t>(file_size));
    archive_write_header(a, e);
    if (file_size <= data.size() && file_size < (1 << 20)) {
      archive_write_data(a, data.data(), file_size);
    } else {
      for (std::size_t done = 0; done < file_size; done += chunk.size())
        archive_write_data(a, chunk.data(), std::min(chunk.size(), file_size - done));
    }
  }
  archive_entry_free(e);
  archive_write_close(a);
  archive_write_free(a);
}

double seconds_of(const std::function<void()>& fn) {
  auto start = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

void run(const std::string& cmd) {
  if (std::system(cmd.c_str()) != 0) {
    std::fprintf(stderr, "failed: %s\n", cmd.c_str());
    std::exit(1);
  }
}

struct Stats {
  std::vector<double> values;
  double median() const {
    auto v = values;
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  }
  double min() const { return *std::min_element(values.begin(), values.end()); }
  double max() const { return *std::max_element(values.begin(), values.end()); }
};

}  // namespace

int main(int argc, char** argv) {
  std::string dir = "/dev/shm/archivebench";
  int rounds = 5, files = 20000, big_mib = 1024;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string flag = argv[i];
    if (flag == "--dir") dir = argv[i + 1];
    else if (flag == "--rounds") rounds = std::atoi(argv[i + 1]);
    else if (flag == "--files") files = std::atoi(argv[i + 1]);
    else if (flag == "--big-mib") big_mib = std::atoi(argv[i + 1]);
  }
  std::filesystem::create_directories(dir);
  std::string small_tar = dir + "/small.tar", big_tar = dir + "/big.tar";
  std::size_t big_file = static_cast<std::size_t>(big_mib) << 17;  // 8 files
  // Generated in a child so this process's peak RSS is the applies' alone.
  pid_t child = ::fork();
  if (child == 0) {
    write_tar(small_tar, files, 200, 200);
    write_tar(big_tar, 8, big_file, 8);
    ::_exit(0);
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  if (status != 0) return 1;
  rusage before{};
  ::getrusage(RUSAGE_SELF, &before);
  std::printf("peak RSS after generating the tars: %ld KiB\n", before.ru_maxrss);
  core::Loop loop;
  int round_id = 0;
  auto fresh = [&] {
    std::string target = dir + "/t" + std::to_string(round_id++);
    std::filesystem::remove_all(target);
    std::filesystem::create_directories(target);
    return target;
  };
  auto layerd_apply = [&](const std::string& tar, const std::string& target) {
    FileSource source(tar);
    sys::UniqueFd fd(::open(target.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    (void)loop.block_on(layerd::archive::apply_tar(source, fd.get(), {}));
  };
  auto cleanup = [&](const std::string& target) { std::filesystem::remove_all(target); };

  std::map<std::string, Stats> small, big;
  for (int r = 0; r < rounds; ++r) {
    // A B C A B C: alternate so drift hits every method alike.
    std::string t = fresh();
    small["layerd apply_tar"].values.push_back(files / seconds_of([&] { layerd_apply(small_tar, t); }));
    cleanup(t);
    t = fresh();
    small["GNU tar -xf"].values.push_back(files / seconds_of([&] { run("tar -xf " + small_tar + " -C " + t); }));
    cleanup(t);
    t = fresh();
    small["bsdtar -xf"].values.push_back(files / seconds_of([&] { run("bsdtar -xf " + small_tar + " -C " + t); }));
    cleanup(t);
  }
  double mb = static_cast<double>(big_file) * 8 / 1e6;
  ::getrusage(RUSAGE_SELF, &before);
  std::printf("peak RSS after the small applies: %ld KiB\n", before.ru_maxrss);
  for (int r = 0; r < rounds; ++r) {
    std::string t = fresh();
    big["layerd apply_tar"].values.push_back(mb / seconds_of([&] { layerd_apply(big_tar, t); }));
    cleanup(t);
    t = fresh();
    big["cat layer.tar > file"].values.push_back(mb / seconds_of([&] { run("cat " + big_tar + " > " + t + "/file"); }));
    cleanup(t);
  }
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  std::printf("dir %s, %d rounds, medians (min-max)\n", dir.c_str(), rounds);
  std::printf("small: %d files of 200 bytes in %d dirs (entries/s)\n", files, files / 200);
  for (auto& [name, s] : small)
    std::printf("  %-22s %9.0f (%.0f-%.0f)\n", name.c_str(), s.median(), s.min(), s.max());
  std::printf("  ratio layerd / GNU tar: %.2f, layerd / bsdtar: %.2f\n",
              small["layerd apply_tar"].median() / small["GNU tar -xf"].median(),
              small["layerd apply_tar"].median() / small["bsdtar -xf"].median());
  std::printf("big: 8 files, %.0f MB (MB/s)\n", mb);
  for (auto& [name, s] : big)
    std::printf("  %-22s %9.0f (%.0f-%.0f)\n", name.c_str(), s.median(), s.min(), s.max());
  std::printf("  ratio layerd / cat: %.2f\n", big["layerd apply_tar"].median() / big["cat layer.tar > file"].median());
  std::printf("peak RSS of this process (applies only): %ld KiB\n", usage.ru_maxrss);
  std::filesystem::remove_all(dir);
}
