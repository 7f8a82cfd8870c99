// apply_tar: regular layers, compression, byte-at-a-time input, the hostile corpus, limits, and
// the loop staying responsive during a large apply.
#include <gtest/gtest.h>

#include <sys/mount.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "helpers.hpp"
#include "layerd/core/loop.hpp"
#include "layerd/core/scope.hpp"
#include "layerd/sys/error.hpp"

using namespace archive_test;
using namespace layerd;
using namespace std::chrono_literals;

namespace {

std::size_t open_fd_count();

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

struct Fixture {
  TempDir tmp;
  std::string target = tmp.sub("target");
  std::string canary = tmp.sub("canary");
};

layerd::archive::ApplyResult apply_layer(const std::vector<std::byte>& tar, const std::string& target,
                           const layerd::archive::ApplyOptions& options = {}, std::size_t chunk = 1 << 16) {
  core::Loop loop;
  MemorySource source(tar, chunk);
  sys::UniqueFd fd(open_dir(target));
  return loop.block_on(layerd::archive::apply_tar(source, fd.get(), options));
}

// Applies a hostile tar: must fail with a message naming `entry`, leave the canary beside the
// target untouched, and leave in the target only `allowed` (paths relative to it).
void expect_refused(const std::vector<std::byte>& tar, const std::string& entry,
                    const std::set<std::string>& allowed = {}, const layerd::archive::ApplyOptions& options = {}) {
  Fixture f;
  try {
    apply_layer(tar, f.target, options);
    ADD_FAILURE() << "apply succeeded; expected a refusal naming " << entry;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(entry), std::string::npos) << e.what();
    std::printf("refused as expected: %s\n", e.what());
  }
  EXPECT_TRUE(snapshot(f.canary).empty()) << "something was created outside the target";
  auto inside = snapshot(f.target);
  for (const auto& [path, desc] : inside) EXPECT_TRUE(allowed.count(path)) << "unexpected " << path;
  // Nothing escaped into the temp dir itself either.
  auto top = snapshot(f.tmp.path);
  for (const auto& [path, desc] : top)
    EXPECT_TRUE(path.rfind("/target", 0) == 0 || path == "/canary") << "escaped: " << path;
}

std::vector<TarEntry> sample_layer() {
  std::vector<TarEntry> e;
  e.push_back({.name = "etc/", .type = AE_IFDIR, .perm = 0755});
  e.push_back({.name = "etc/hosts", .data = "127.0.0.1 localhost\n"});
  e.push_back({.name = "etc/big", .perm = 0600, .data = std::string(300000, 'x')});
  e.push_back({.name = "etc/empty", .perm = 0640});
  e.push_back({.name = "etc/link", .type = AE_IFLNK, .perm = 0777, .link = "hosts"});
  e.push_back({.name = "etc/hard", .hardlink = "etc/hosts"});
  e.push_back({.name = "etc/.wh.removed"});
  e.push_back({.name = "opt/deep/file", .perm = 0755, .data = "implicit parents"});
  e.push_back({.name = "opt/.wh..wh..opq"});
  e.push_back({.name = "fifo", .type = AE_IFIFO, .perm = 0600});
  e.push_back({.name = "/abs/file", .data = "absolute names are made relative (Docker)"});
  return e;
}

void check_sample(const std::string& target) {
  auto s = snapshot(target);
  EXPECT_TRUE(s.count("/etc/hosts"));
  EXPECT_TRUE(s.count("/etc/.wh.removed"));
  EXPECT_TRUE(s.count("/opt/.wh..wh..opq"));
  EXPECT_TRUE(s.count("/opt/deep/file"));
  EXPECT_TRUE(s.count("/abs/file"));
  struct stat a, b;
  ASSERT_EQ(::lstat((target + "/etc/hosts").c_str(), &a), 0);
  ASSERT_EQ(::lstat((target + "/etc/hard").c_str(), &b), 0);
  EXPECT_EQ(a.st_ino, b.st_ino);
  EXPECT_EQ(a.st_mtim.tv_sec, 1'600'000'000);
  ASSERT_EQ(::lstat((target + "/etc/big").c_str(), &a), 0);
  EXPECT_EQ(a.st_size, 300000);
  EXPECT_EQ(a.st_mode & 07777, 0600);
  ASSERT_EQ(::lstat((target + "/etc").c_str(), &a), 0);
  EXPECT_EQ(a.st_mtim.tv_sec, 1'600'000'000) << "directory times are set after their children";
  ASSERT_EQ(::lstat((target + "/fifo").c_str(), &a), 0);
  EXPECT_TRUE(S_ISFIFO(a.st_mode));
  ASSERT_EQ(::lstat((target + "/etc/link").c_str(), &a), 0);
  EXPECT_TRUE(S_ISLNK(a.st_mode));
}

TEST(ApplyTar, AppliesALayer) {
  Fixture f;
  auto r = apply_layer(make_tar(sample_layer()), f.target);
  check_sample(f.target);
  // Regular data (hardlink once) plus the symlink's length, as the seed's directory.Size.
  EXPECT_EQ(r.bytes_applied, 20u + 300000u + 16u + 41u + 5u);
  EXPECT_EQ(r.entries, 11u);
}

TEST(ApplyTar, EmptyStreamIsAnEmptyLayer) {
  Fixture f;
  auto r = apply_layer({}, f.target);
  EXPECT_EQ(r.entries, 0u);
  EXPECT_TRUE(snapshot(f.target).empty());
}

TEST(ApplyTar, CompressedInput) {
  for (const char* filter : {"gzip", "xz", "zstd"}) {
    SCOPED_TRACE(filter);
    Fixture f;
    apply_layer(make_tar(sample_layer(), filter), f.target);
    check_sample(f.target);
  }
}

TEST(ApplyTar, OneByteChunks) {
  Fixture f;
  apply_layer(make_tar(sample_layer(), "gzip"), f.target, {}, 1);
  check_sample(f.target);
  Fixture g;
  apply_layer(make_tar(sample_layer()), g.target, {}, 1);
  check_sample(g.target);
}

TEST(ApplyTar, OwnersModesXattrsAndIdMaps) {
  if (!is_root()) GTEST_SKIP() << "needs root for chown";
  Fixture f;
  std::vector<TarEntry> e;
  e.push_back({.name = "d/", .type = AE_IFDIR, .perm = 02775, .uid = 5, .gid = 6});
  e.push_back({.name = "d/suid", .perm = 04755, .data = "x", .uid = 7, .gid = 8,
               .xattrs = {{"user.note", "hello"}}});
  e.push_back({.name = "d/l", .type = AE_IFLNK, .perm = 0777, .link = "/nowhere", .uid = 9, .gid = 9});
  e.push_back({.name = "null", .type = AE_IFCHR, .perm = 0666, .rdev = makedev(1, 3)});
  layerd::archive::ApplyOptions options;
  options.uid_maps = {{0, 100000, 65536}};
  options.gid_maps = {{0, 200000, 65536}};
  apply_layer(make_tar(e), f.target, options);
  struct stat st;
  ASSERT_EQ(::lstat((f.target + "/d").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 02775);
  EXPECT_EQ(st.st_uid, 100005u);
  EXPECT_EQ(st.st_gid, 200006u);
  ASSERT_EQ(::lstat((f.target + "/d/suid").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 04755);
  EXPECT_EQ(st.st_uid, 100007u);
  char value[16];
  ASSERT_EQ(::lgetxattr((f.target + "/d/suid").c_str(), "user.note", value, sizeof value), 5);
  ASSERT_EQ(::lstat((f.target + "/d/l").c_str(), &st), 0);
  EXPECT_EQ(st.st_uid, 100009u);
  ASSERT_EQ(::lstat((f.target + "/null").c_str(), &st), 0);
  EXPECT_TRUE(S_ISCHR(st.st_mode));
  EXPECT_EQ(st.st_rdev, makedev(1, 3));
}

TEST(ApplyTar, UnmappedIdIsRefused) {
  layerd::archive::ApplyOptions options;
  options.uid_maps = {{0, 100000, 10}};
  expect_refused(make_tar({{.name = "f", .data = "x", .uid = 50}}), "'f'", {}, options);
}

TEST(ApplyTar, HostileCorpus) {
  std::string canary_abs = "../canary";
  // Traversal.
  expect_refused(make_tar({{.name = "../canary/evil", .data = "x"}}), "../canary/evil");
  expect_refused(make_tar({{.name = "a/../../canary/evil", .data = "x"}}), "a/../../canary/evil");
  // Through a symlink, at depth 1 and 3, relative and absolute.
  expect_refused(make_tar({{.name = "l", .type = AE_IFLNK, .perm = 0777, .link = "../canary"},
                           {.name = "l/evil", .data = "x"}}),
                 "l/evil", {"/l"});
  expect_refused(make_tar({{.name = "a/b/", .type = AE_IFDIR, .perm = 0755},
                           {.name = "a/b/l", .type = AE_IFLNK, .perm = 0777, .link = "/"},
                           {.name = "a/b/l/tmp/evil/", .type = AE_IFDIR, .perm = 0755}}),
                 "a/b/l/tmp/evil", {"/a", "/a/b", "/a/b/l"});
  expect_refused(make_tar({{.name = "l", .type = AE_IFLNK, .perm = 0777, .link = "."},
                           {.name = "l/x", .type = AE_IFLNK, .perm = 0777, .link = "/etc"}}),
                 "l/x", {"/l"});
  // Hardlinks: outside, through a symlink, missing, to a directory.
  expect_refused(make_tar({{.name = "h", .hardlink = "../canary/x"}}), "'h'");
  expect_refused(make_tar({{.name = "l", .type = AE_IFLNK, .perm = 0777, .link = "/etc"},
                           {.name = "h", .hardlink = "l/passwd"}}),
                 "'h'", {"/l"});
  expect_refused(make_tar({{.name = "h", .hardlink = "missing"}}), "does not exist");
  expect_refused(make_tar({{.name = "d/", .type = AE_IFDIR, .perm = 0755}, {.name = "h", .hardlink = "d"}}),
                 "'h'", {"/d"});
  // Names too long.
  expect_refused(make_tar({{.name = std::string(300, 'n'), .data = "x"}}), std::string(300, 'n').substr(0, 100));
  layerd::archive::ApplyOptions short_names;
  short_names.max_name_length = 20;
  expect_refused(make_tar({{.name = "a/b/c/d/e/f/g/h/i/j/k/l", .data = "x"}}), "a/b/c/d", {}, short_names);
  // A parent that is a file.
  expect_refused(make_tar({{.name = "f", .data = "x"}, {.name = "f/g", .data = "y"}}), "f/g", {"/f"});
  // Duplicates.
  expect_refused(make_tar({{.name = "dup", .data = "1"}, {.name = "dup", .data = "2"}}), "'dup'", {"/dup"});
  expect_refused(make_tar({{.name = "dup", .data = "1"}, {.name = "dup/", .type = AE_IFDIR, .perm = 0755}}),
                 "dup", {"/dup"});
  expect_refused(make_tar({{.name = "dup", .type = AE_IFLNK, .perm = 0777, .link = "x"},
                           {.name = "dup", .type = AE_IFLNK, .perm = 0777, .link = "/etc"}}),
                 "'dup'", {"/dup"});
  // A root-naming non-directory.
  expect_refused(make_tar({{.name = "./", .data = "x"}}), "./");
}

// Small files go to the offload pool in batches of dozens: every file of every batch arrives with
// its own content, mode and mtime; a hardlink to a file still queued in the current batch finds
// it; a duplicate deep inside a later batch is an error naming it, with no descriptor left open.
TEST(ApplyTar, ManySmallFilesInBatches) {
  auto file_name = [](int i) { return "d" + std::to_string(i % 7) + "/f" + std::to_string(i); };
  std::vector<TarEntry> entries;
  for (int i = 0; i < 300; ++i) {
    entries.push_back({.name = file_name(i),
                       .perm = static_cast<mode_t>(i % 2 ? 0600 : 0644),
                       .data = "content of " + std::to_string(i) + std::string(static_cast<std::size_t>(i), 'c'),
                       .mtime = 1'500'000'000 + i});
  }
  entries.push_back({.name = "hard", .hardlink = file_name(299)});
  {
    Fixture f;
    auto r = apply_layer(make_tar(entries), f.target);
    EXPECT_EQ(r.entries, 301u);
    for (int i = 0; i < 300; ++i) {
      SCOPED_TRACE(file_name(i));
      std::string path = f.target + "/" + file_name(i);
      EXPECT_EQ(read_file(path), "content of " + std::to_string(i) + std::string(static_cast<std::size_t>(i), 'c'));
      struct stat st{};
      ASSERT_EQ(::lstat(path.c_str(), &st), 0);
      EXPECT_EQ(st.st_mode & 07777, i % 2 ? 0600u : 0644u);
      EXPECT_EQ(st.st_mtim.tv_sec, 1'500'000'000 + i);
    }
    struct stat a{}, b{};
    ASSERT_EQ(::lstat((f.target + "/hard").c_str(), &a), 0);
    ASSERT_EQ(::lstat((f.target + "/" + file_name(299)).c_str(), &b), 0);
    EXPECT_EQ(a.st_ino, b.st_ino);
  }
  entries.pop_back();
  entries.insert(entries.begin() + 250, TarEntry{.name = file_name(200), .data = "again"});
  Fixture g;
  const std::size_t fds_before = open_fd_count();
  try {
    apply_layer(make_tar(entries), g.target);
    ADD_FAILURE() << "a duplicate entry was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.errno_value(), EEXIST) << e.what();
    EXPECT_NE(std::string(e.what()).find("'" + file_name(200) + "'"), std::string::npos) << e.what();
  }
  EXPECT_EQ(open_fd_count(), fds_before);
  EXPECT_EQ(read_file(g.target + "/" + file_name(200)), "content of 200" + std::string(200, 'c'));
}

// Consecutive directory entries are created by one offload job, in order: nested ones, one
// listed twice (the second's mode wins, as an explicit entry over an implicit parent), one whose
// parent lies below the run without being listed (created implicitly after the run), and a
// set-gid directory whose subdirectories in the same run inherit its group; all keep their
// modes and times.
TEST(ApplyTar, DirectoryRuns) {
  Fixture f;
  std::vector<TarEntry> e;
  e.push_back({.name = "a/", .type = AE_IFDIR, .perm = 0755, .mtime = 1'400'000'001});
  e.push_back({.name = "a/b/", .type = AE_IFDIR, .perm = 0700, .mtime = 1'400'000'002});
  e.push_back({.name = "a/b/c/", .type = AE_IFDIR, .perm = 0750, .mtime = 1'400'000'003});
  e.push_back({.name = "a/b/", .type = AE_IFDIR, .perm = 0711, .mtime = 1'400'000'004});
  e.push_back({.name = "a/x/y/", .type = AE_IFDIR, .perm = 0755, .mtime = 1'400'000'005});
  e.push_back({.name = "g/", .type = AE_IFDIR, .perm = 02775, .gid = is_root() ? 4242 : 0, .mtime = 1'400'000'006});
  e.push_back({.name = "g/sub/", .type = AE_IFDIR, .perm = 0755, .mtime = 1'400'000'007});
  e.push_back({.name = "a/b/c/file", .data = "in a run's directory"});
  auto r = apply_layer(make_tar(e), f.target);
  EXPECT_EQ(r.entries, 8u);
  auto mode_time = [&](const std::string& rel) {
    struct stat st{};
    EXPECT_EQ(::lstat((f.target + "/" + rel).c_str(), &st), 0) << rel;
    return std::make_pair(st.st_mode & 07777, st.st_mtim.tv_sec);
  };
  EXPECT_EQ(mode_time("a"), std::make_pair(mode_t{0755}, time_t{1'400'000'001}));
  EXPECT_EQ(mode_time("a/b"), std::make_pair(mode_t{0711}, time_t{1'400'000'004}));
  EXPECT_EQ(mode_time("a/b/c"), std::make_pair(mode_t{0750}, time_t{1'400'000'003}));
  EXPECT_EQ(mode_time("a/x/y"), std::make_pair(mode_t{0755}, time_t{1'400'000'005}));
  EXPECT_EQ(mode_time("a/x").first, 0755u) << "an implicit parent is created 0755";
  EXPECT_EQ(mode_time("g"), std::make_pair(mode_t{02775}, time_t{1'400'000'006}));
  // A subdirectory of a set-gid directory keeps the set-gid bit (the kernel's rule, which a
  // chmod would otherwise clear) unless its entry says otherwise: Docker applies the entry's mode.
  EXPECT_EQ(mode_time("g/sub"), std::make_pair(mode_t{0755}, time_t{1'400'000'007}));
  if (is_root()) {
    struct stat st{};
    ASSERT_EQ(::lstat((f.target + "/g/sub").c_str(), &st), 0);
    EXPECT_EQ(st.st_gid, 0u) << "the entry's group (0) over the inherited one";
    ASSERT_EQ(::lstat((f.target + "/g").c_str(), &st), 0);
    EXPECT_EQ(st.st_gid, 4242u);
  }
  struct stat st{};
  EXPECT_EQ(::lstat((f.target + "/a/b/c/file").c_str(), &st), 0);

  // A directory entry over a symlink of the same name is refused, naming it, after the run
  // before it was applied; and the entry limit stops a run at the entry that crosses it.
  expect_refused(make_tar({{.name = "l", .type = AE_IFLNK, .perm = 0777, .link = "/etc"},
                           {.name = "ok/", .type = AE_IFDIR, .perm = 0755},
                           {.name = "l/", .type = AE_IFDIR, .perm = 0755}}),
                 "'l/'", {"/l", "/ok"});
  layerd::archive::ApplyOptions few;
  few.max_entries = 3;
  expect_refused(make_tar({{.name = "d1/", .type = AE_IFDIR, .perm = 0755},
                           {.name = "d2/", .type = AE_IFDIR, .perm = 0755},
                           {.name = "d3/", .type = AE_IFDIR, .perm = 0755},
                           {.name = "d4/", .type = AE_IFDIR, .perm = 0755}}),
                 "'d4/'", {"/d1", "/d2", "/d3"}, few);
}

// Rewrites the size field of the first ustar header and fixes its checksum.
void set_ustar_size(std::vector<std::byte>& tar, const std::string& octal) {
  auto* h = reinterpret_cast<unsigned char*>(tar.data());
  std::memset(h + 124, 0, 12);
  std::memcpy(h + 124, octal.data(), octal.size());
  std::memset(h + 148, ' ', 8);
  unsigned sum = 0;
  for (int i = 0; i < 512; ++i) sum += h[i];
  std::snprintf(reinterpret_cast<char*>(h + 148), 8, "%06o", sum);
  h[155] = ' ';
}

// "f" is still queued for a batch on the offload pool; "f/g" must not race it by creating "f" as
// an implicit parent directory first (the error then named "f" as a duplicate, now and then).
TEST(ApplyTar, FileThenPathUnderItAlwaysBlamesThePathUnderIt) {
  for (int i = 0; i < 30; ++i) {
    SCOPED_TRACE(i);
    std::vector<TarEntry> entries;
    std::set<std::string> allowed = {"/f"};  // apply_tar leaves the rest to its caller's cleanup
    for (int k = 0; k < 20; ++k) {
      entries.push_back({.name = "x" + std::to_string(k), .data = "x"});
      allowed.insert("/x" + std::to_string(k));
    }
    entries.push_back({.name = "f", .data = "1"});
    entries.push_back({.name = "f/g", .data = "2"});
    expect_refused(make_tar(entries), "'f/g'", allowed, {});
  }
}

TEST(ApplyTar, TruncatedAndCorruptInput) {
  // Data shorter than the header says: cut the tar inside the big file (small and large paths).
  for (std::size_t size : {std::size_t{5000}, std::size_t{300000}}) {
    auto tar = make_tar({{.name = "ok", .data = "fine"}, {.name = "cut", .data = std::string(size, 'z')}});
    tar.resize(1536 + 512 + size / 2);
    expect_refused(tar, "cut", {"/ok"});
  }
  // A header declaring a huge size with no data behind it.
  auto huge = make_tar({{.name = "huge", .data = "tiny"}});
  set_ustar_size(huge, "77777777777");  // 8 GiB declared, 4 bytes present
  expect_refused(huge, "huge");
  // Corrupt compression.
  auto gz = make_tar(sample_layer(), "gzip");
  for (std::size_t i = gz.size() / 3; i < gz.size() / 3 + 64 && i < gz.size(); ++i) gz[i] ^= std::byte{0x5a};
  expect_refused(gz, "tar", {"/etc", "/etc/hosts", "/etc/big", "/etc/empty", "/etc/link", "/etc/hard",
                             "/etc/.wh.removed", "/opt", "/opt/deep", "/opt/deep/file", "/opt/.wh..wh..opq", "/fifo",
                             "/abs", "/abs/file"});
  // Not a tar at all.
  std::string junk(4096, 'j');
  std::vector<std::byte> junk_bytes(reinterpret_cast<const std::byte*>(junk.data()),
                                    reinterpret_cast<const std::byte*>(junk.data()) + junk.size());
  expect_refused(junk_bytes, "tar stream");
}

TEST(ApplyTar, Limits) {
  layerd::archive::ApplyOptions few;
  few.max_entries = 2;
  expect_refused(make_tar({{.name = "a", .data = "1"}, {.name = "b", .data = "2"}, {.name = "c", .data = "3"}}),
                 "'c'", {"/a", "/b"}, few);
  layerd::archive::ApplyOptions small;
  small.max_bytes = 1000;
  expect_refused(make_tar({{.name = "a", .data = std::string(600, 'a')}, {.name = "b", .data = std::string(600, 'b')}}),
                 "'b'", {"/a"}, small);
}

std::size_t open_fd_count() {
  std::size_t n = 0;
  for ([[maybe_unused]] auto& e : std::filesystem::directory_iterator("/proc/self/fd")) ++n;
  return n;
}

// A full disk in the middle of a file (small files are written in batches, a large one block by
// block) is an error naming the entry, and leaves no descriptor open.
TEST(ApplyTar, DiskFullNamesTheEntryAndLeaksNothing) {
  if (!is_root()) GTEST_SKIP() << "needs root to mount a small tmpfs";
  TempDir tmp;
  ASSERT_EQ(::mount("tmpfs", tmp.path.c_str(), "tmpfs", 0, "size=1m,nr_inodes=1000"), 0) << std::strerror(errno);
  struct Unmount {
    std::string path;
    ~Unmount() { (void)::umount2(path.c_str(), MNT_DETACH); }
  } unmount{tmp.path};
  for (std::size_t size : {std::size_t{40000}, std::size_t{3000000}}) {
    std::vector<TarEntry> entries;
    for (int i = 0; i < 40; ++i) entries.push_back({.name = "f" + std::to_string(i), .data = std::string(size, 'q')});
    std::string target = tmp.sub("t" + std::to_string(size));
    const std::size_t fds_before = open_fd_count();
    try {
      apply_layer(make_tar(entries), target);
      ADD_FAILURE() << "a 1 MiB filesystem took " << 40 * size << " bytes";
    } catch (const Error& e) {
      EXPECT_EQ(e.errno_value(), ENOSPC) << e.what();
      EXPECT_NE(std::string(e.what()).find("tar entry 'f"), std::string::npos) << e.what();
      std::printf("refused as expected: %s\n", e.what());
    }
    EXPECT_EQ(open_fd_count(), fds_before);
    std::filesystem::remove_all(target);
  }
}

TEST(ApplyTar, DeviceNodesWithoutPermissionAreSkippedWhenAllowed) {
  Fixture f;
  layerd::archive::ApplyOptions options;
  options.allow_device_nodes = false;
  apply_layer(make_tar({{.name = "null", .type = AE_IFCHR, .perm = 0666, .rdev = makedev(1, 3)},
                  {.name = "f", .data = "x"}}),
        f.target, options);
  auto s = snapshot(f.target);
  EXPECT_FALSE(s.count("/null"));
  EXPECT_TRUE(s.count("/f"));
}

// A socket-like source: gives the loop a turn on every read, and produces a large tar on the fly.
class GeneratedLayer final : public ByteSource {
 public:
  explicit GeneratedLayer(std::size_t file_size) : header_(make_header(file_size)), size_(file_size) {}
  Task<std::size_t> read(std::span<std::byte> buf) override {
    co_await core::yield();
    std::size_t total = header_.size() + size_ + padding() + 1024;
    std::size_t n = std::min(buf.size(), total - pos_);
    for (std::size_t i = 0; i < n;) {
      std::size_t p = pos_ + i;
      if (p < header_.size()) {
        std::size_t k = std::min(n - i, header_.size() - p);
        std::memcpy(buf.data() + i, header_.data() + p, k);
        i += k;
      } else if (p < header_.size() + size_) {
        std::size_t k = std::min(n - i, header_.size() + size_ - p);
        std::memset(buf.data() + i, 'L', k);
        i += k;
      } else {
        std::memset(buf.data() + i, 0, n - i);
        i = n;
      }
    }
    pos_ += n;
    co_return n;
  }

 private:
  std::size_t padding() const { return (512 - size_ % 512) % 512; }
  static std::vector<std::byte> make_header(std::size_t size) {
    auto tar = make_tar({{.name = "big", .data = "", .declared_size = static_cast<std::int64_t>(size)}});
    tar.resize(512);
    return tar;
  }
  std::vector<std::byte> header_;
  std::size_t size_;
  std::size_t pos_ = 0;
};

struct Ticker {
  bool stop = false;
  std::chrono::nanoseconds max_late{0};
  int ticks = 0;
};

core::Task<void> tick(Ticker* t) {
  while (!t->stop) {
    auto before = core::Clock::now();
    (void)co_await core::sleep(5ms);
    auto late = core::Clock::now() - before - 5ms;
    t->max_late = std::max(t->max_late, std::chrono::duration_cast<std::chrono::nanoseconds>(late));
    ++t->ticks;
  }
}

core::Task<layerd::archive::ApplyResult> apply_then_stop(ByteSource* source, int fd, Ticker* t) {
  auto r = co_await layerd::archive::apply_tar(*source, fd, {});
  t->stop = true;
  co_return r;
}

TEST(ApplyTar, LoopStaysResponsiveDuringALargeApply) {
  TempDir tmp("/dev/shm");
  std::string target = tmp.sub("target");
  core::Loop loop;
  Ticker ticker;
  core::Scope scope;
  scope.spawn(tick(&ticker));
  GeneratedLayer source(256u << 20);
  sys::UniqueFd fd(open_dir(target));
  auto start = std::chrono::steady_clock::now();
  auto r = loop.block_on(apply_then_stop(&source, fd.get(), &ticker));
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  loop.block_on(scope.join());
  EXPECT_EQ(r.bytes_applied, 256u << 20);
  std::printf("256 MiB apply: %.2f s (%.0f MB/s), %d ticks, max tick delay %.2f ms\n", secs,
              256 * 1.048576 / secs, ticker.ticks,
              std::chrono::duration<double, std::milli>(ticker.max_late).count());
  EXPECT_LT(ticker.max_late, 200ms);
  EXPECT_GT(ticker.ticks, 3);
}

}  // namespace
