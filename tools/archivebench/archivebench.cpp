// archivebench: layerd's apply_tar against GNU tar, bsdtar and cat, same filesystem, same run,
// alternating rounds; medians with min and max.
//
//   archivebench [--dir /dev/shm/archivebench] [--rounds 5] [--files 20000] [--big-mib 1024]
//                [--parent-files 100000] [--only apply|small|big|diff|profile-small|profile-big]
//
// apply: apply_tar of a many-small-file layer and of a 1 GiB layer of 8 files.
// profile-small: layerd's small-file apply alone, `rounds` times into fresh directories removed
// only at the end by `rm` (so a profile of this process sees the applies alone); prints
// files/s and the CPU the process (loop and io-wq workers) spent per file.
// profile-big: layerd's 1 GiB apply alone (each tree removed by `rm` after its round); MB/s and
// CPU per MB.
// diff: Diff and Changes of a layer with 3 changed files over a large parent, native (the upper
// directory only) against the naive path (a full walk of the merged tree compared with the
// parent's), the merged tree being a real fuse-overlayfs mount when possible.
#include <archive.h>
#include <archive_entry.h>
#include <fcntl.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/sysmacros.h>
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

class NullSink final : public layerd::archive::ByteSink {
 public:
  core::Task<void> write(std::span<const std::byte> data) override {
    bytes += data.size();
    co_return;
  }
  std::uint64_t bytes = 0;
};

void write_small(const std::string& path, const std::string& content) {
  sys::UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (!fd || ::write(fd.get(), content.data(), content.size()) != static_cast<ssize_t>(content.size())) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
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

struct DiffTimes {
  std::vector<layerd::archive::Change> native_changes, naive_changes;
  std::uint64_t native_tar = 0, naive_tar = 0;
};

// Diff/Changes of 3 changed files over a `parent_files` parent: native against naive.
int diff_bench(core::Loop& loop, const std::string& dir, int rounds, int parent_files) {
  const std::string parent = dir + "/parent", upper = dir + "/upper", work = dir + "/work",
                    merged = dir + "/merged";
  // A run that died left its mount behind: remove_all would fail on it.
  (void)::umount2(merged.c_str(), MNT_DETACH);
  std::filesystem::remove_all(dir);
  for (const auto& d : {parent, upper, work, merged}) std::filesystem::create_directories(d);
  const int per_dir = 1000;
  for (int i = 0; i < parent_files; ++i) {
    std::string d = parent + "/d" + std::to_string(i / per_dir);
    if (i % per_dir == 0) std::filesystem::create_directories(d);
    write_small(d + "/f" + std::to_string(i), std::string(100, 'p'));
  }
  // The layer: one file modified, one added, one deleted (an overlay whiteout as fuse-overlayfs
  // makes it as root, or an AUFS one otherwise).
  std::filesystem::create_directories(upper + "/d0");
  std::filesystem::create_directories(upper + "/d1");
  std::filesystem::create_directories(upper + "/d2");
  write_small(upper + "/d0/f0", "modified");
  write_small(upper + "/d1/added", "added");
  std::string deleted = upper + "/d2/f" + std::to_string(2 * per_dir);
  if (::mknod(deleted.c_str(), S_IFCHR, makedev(0, 0)) != 0)
    write_small(upper + "/d2/.wh.f" + std::to_string(2 * per_dir), "");
  // The merged tree: a real fuse-overlayfs mount (what the naive path walks), else a copy.
  bool mounted = std::system(("fuse-overlayfs -o lowerdir=" + parent + ",upperdir=" + upper +
                              ",workdir=" + work + " " + merged + " 2>/dev/null").c_str()) == 0;
  if (!mounted) {
    run("cp -a " + parent + "/. " + merged);
    run("cp " + upper + "/d0/f0 " + merged + "/d0/f0 && cp " + upper + "/d1/added " + merged +
        "/d1/added && rm " + merged + "/d2/f" + std::to_string(2 * per_dir));
  }
  sys::UniqueFd parent_fd(::open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  sys::UniqueFd upper_fd(::open(upper.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  sys::UniqueFd merged_fd(::open(merged.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  std::map<std::string, Stats> times;
  DiffTimes last;
  for (int r = 0; r < rounds; ++r) {
    times["Changes native"].values.push_back(seconds_of([&] {
      last.native_changes = loop.block_on(layerd::archive::upper_changes(upper_fd.get(), {parent_fd.get()}));
    }));
    times["Changes naive"].values.push_back(seconds_of([&] {
      last.naive_changes = loop.block_on(layerd::archive::compare_trees(merged_fd.get(), parent_fd.get()));
    }));
    times["Diff native"].values.push_back(seconds_of([&] {
      NullSink sink;
      loop.block_on(layerd::archive::export_diff(upper_fd.get(), sink));
      last.native_tar = sink.bytes;
    }));
    times["Diff naive"].values.push_back(seconds_of([&] {
      NullSink sink;
      auto changes = loop.block_on(layerd::archive::compare_trees(merged_fd.get(), parent_fd.get()));
      loop.block_on(layerd::archive::export_changes(merged_fd.get(), changes, sink));
      last.naive_tar = sink.bytes;
    }));
  }
  std::printf("diff: 3 changed files over a %d-file parent, merged tree %s; %d rounds, ms: median (min-max)\n",
              parent_files, mounted ? "a fuse-overlayfs mount" : "a plain copy (no fuse-overlayfs)", rounds);
  for (auto& [name, s] : times)
    std::printf("  %-16s %10.3f (%.3f-%.3f)\n", name.c_str(), s.median() * 1e3, s.min() * 1e3, s.max() * 1e3);
  std::printf("  Changes: native %zu entries, naive %zu entries (%s)\n", last.native_changes.size(),
              last.naive_changes.size(), last.native_changes == last.naive_changes ? "identical" : "DIFFERENT");
  std::printf("  Diff tar: native %llu bytes, naive %llu bytes\n",
              static_cast<unsigned long long>(last.native_tar), static_cast<unsigned long long>(last.naive_tar));
  std::printf("  speedup native / naive: Changes %.0fx, Diff %.0fx\n",
              times["Changes naive"].median() / times["Changes native"].median(),
              times["Diff naive"].median() / times["Diff native"].median());
  if (mounted) (void)::umount2(merged.c_str(), MNT_DETACH);
  parent_fd.reset();
  upper_fd.reset();
  merged_fd.reset();
  std::filesystem::remove_all(dir);
  return last.native_changes == last.naive_changes ? 0 : 1;
}

int main(int argc, char** argv) {
  std::string dir = "/dev/shm/archivebench";
  std::string only;
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  int rounds = 5, files = 20000, big_mib = 1024, parent_files = 100000;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string flag = argv[i];
    if (flag == "--dir") dir = argv[i + 1];
    else if (flag == "--rounds") rounds = std::atoi(argv[i + 1]);
    else if (flag == "--files") files = std::atoi(argv[i + 1]);
    else if (flag == "--big-mib") big_mib = std::atoi(argv[i + 1]);
    else if (flag == "--parent-files") parent_files = std::atoi(argv[i + 1]);
    else if (flag == "--only") only = argv[i + 1];
  }
  if (only == "diff") {
    core::Loop loop;
    return diff_bench(loop, dir + "/diff", rounds, parent_files);
  }
  std::filesystem::create_directories(dir);
  std::string small_tar = dir + "/small.tar", big_tar = dir + "/big.tar";
  std::size_t big_file = static_cast<std::size_t>(big_mib) << 17;  // 8 files
  // Generated in a child so this process's peak RSS is the applies' alone.
  pid_t child = ::fork();
  if (child == 0) {
    write_tar(small_tar, files, 200, 200);
    if (only != "small" && only != "profile-small") write_tar(big_tar, 8, big_file, 8);
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
  // One apply on its own: its rate in `units` per second and the CPU per unit, in µs, that this
  // process (the loop, io-wq workers, the offload pool) spent on it.
  auto profile_apply = [&](const std::string& tar, const std::string& target, double units, Stats& rate, Stats& cpu) {
    auto cpu_us = [] {
      rusage u{};
      ::getrusage(RUSAGE_SELF, &u);
      return (u.ru_utime.tv_sec + u.ru_stime.tv_sec) * 1e6 + u.ru_utime.tv_usec + u.ru_stime.tv_usec;
    };
    const double before = cpu_us();
    rate.values.push_back(units / seconds_of([&] { layerd_apply(tar, target); }));
    cpu.values.push_back((cpu_us() - before) / units);
  };
  if (only == "profile-small") {
    std::vector<std::string> targets;
    for (int r = 0; r < rounds; ++r) targets.push_back(fresh());
    Stats rate, cpu;
    for (const auto& t : targets) profile_apply(small_tar, t, files, rate, cpu);
    // Removed by another process, so a profile of this one holds the applies alone.
    for (const auto& t : targets) run("rm -rf " + t);
    std::filesystem::remove_all(dir);
    std::printf("layerd small apply, %d files, %d rounds: %.0f files/s (%.0f-%.0f), CPU %.2f us/file (%.2f-%.2f)\n",
                files, rounds, rate.median(), rate.min(), rate.max(), cpu.median(), cpu.min(), cpu.max());
    return 0;
  }

  if (only == "profile-big") {
    Stats rate, cpu;
    const double mb = static_cast<double>(big_file) * 8 / 1e6;
    for (int r = 0; r < rounds; ++r) {
      std::string t = fresh();
      profile_apply(big_tar, t, mb, rate, cpu);
      run("rm -rf " + t);
    }
    std::printf("layerd big apply, %.0f MB, %d rounds: %.0f MB/s (%.0f-%.0f), CPU %.0f us/MB (%.0f-%.0f)\n", mb,
                rounds, rate.median(), rate.min(), rate.max(), cpu.median(), cpu.min(), cpu.max());
    std::filesystem::remove_all(dir);
    return 0;
  }

  std::map<std::string, Stats> small, big;
  const bool run_small = only != "big", run_big = only != "small";
  for (int r = 0; r < rounds && run_small; ++r) {
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
  for (int r = 0; r < rounds && run_big; ++r) {
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
  if (run_small) {
    std::printf("small: %d files of 200 bytes in %d dirs (entries/s)\n", files, files / 200);
    for (auto& [name, s] : small)
      std::printf("  %-22s %9.0f (%.0f-%.0f)\n", name.c_str(), s.median(), s.min(), s.max());
    std::printf("  ratio layerd / GNU tar: %.2f, layerd / bsdtar: %.2f\n",
                small["layerd apply_tar"].median() / small["GNU tar -xf"].median(),
                small["layerd apply_tar"].median() / small["bsdtar -xf"].median());
  }
  if (run_big) {
    std::printf("big: 8 files, %.0f MB (MB/s)\n", mb);
    for (auto& [name, s] : big)
      std::printf("  %-22s %9.0f (%.0f-%.0f)\n", name.c_str(), s.median(), s.min(), s.max());
    std::printf("  ratio layerd / cat: %.2f\n", big["layerd apply_tar"].median() / big["cat layer.tar > file"].median());
  }
  std::printf("peak RSS of this process (applies only): %ld KiB\n", usage.ru_maxrss);
  std::filesystem::remove_all(dir);
  if (only.empty()) return diff_bench(loop, dir + "/diff", rounds, parent_files);
  return 0;
}
