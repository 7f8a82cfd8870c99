// Diff I/O through the driver with real fuse-overlayfs mounts (root and /dev/fuse needed; skipped
// otherwise): ApplyDiff into a chain and reading through the merged view, Diff -> ApplyDiff round
// trips of containers edited through the mount (whiteouts in fuse-overlayfs's own on-disk form),
// exact Changes for scripted edits, DiffSize, the naive fallback for a parent that is not the
// direct one, hostile tars, and refusals.
#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "helpers.hpp"  // tests/unit/archive: MemorySource, MemorySink, make_tar, list_tar
#include "layerd/core/loop.hpp"
#include "layerd/driver/driver.hpp"
#include "layerd/sys/error.hpp"
#include "driver_fixture.hpp"
#include "test_support.hpp"

namespace fs = std::filesystem;
using namespace layerd;
using archive_test::list_tar;
using archive_test::make_tar;
using archive_test::MemorySink;
using archive_test::MemorySource;
using archive_test::TarEntry;
using driver::Change;
using driver::CreateRequest;
using driver::Driver;
using test::read_file;
using test::write_file;

namespace {

// "docker diff" form: "A /path", "C /path", "D /path".
std::vector<std::string> docker_form(const std::vector<Change>& changes) {
  std::vector<std::string> out;
  for (const auto& c : changes)
    out.push_back(std::string(c.kind == Change::kAdded ? "A " : c.kind == Change::kDeleted ? "D " : "C ") + c.path);
  return out;
}

std::vector<std::string> sorted(std::vector<std::string> v) {
  std::sort(v.begin(), v.end());
  return v;
}

// Everything a merged view shows below `root` (the root itself excluded: its times belong to the
// upper directory, which a tar does not carry): type, mode, owner, mtime in whole seconds (what
// a tar carries, as Docker's), size, content, symlink target, device number, xattrs, and the
// hardlink group (the first path of the inode).
std::map<std::string, std::string> merged_snapshot(const std::string& root) {
  std::map<std::string, std::string> out;
  std::vector<std::string> paths;
  for (auto it = fs::recursive_directory_iterator(root); it != fs::recursive_directory_iterator(); ++it)
    paths.push_back(it->path().string());
  std::sort(paths.begin(), paths.end());
  std::map<ino_t, std::string> first_name;
  for (const auto& p : paths) {
    struct stat st {};
    if (::lstat(p.c_str(), &st) != 0) {
      out[p] = "lstat failed";
      continue;
    }
    const std::string rel = p.substr(root.size());
    std::string d = std::to_string(st.st_mode) + " " + std::to_string(st.st_uid) + ":" +
                    std::to_string(st.st_gid) + " t" + std::to_string(st.st_mtim.tv_sec);
    if (S_ISREG(st.st_mode)) {
      d += " s" + std::to_string(st.st_size) + " " + std::to_string(std::hash<std::string>{}(read_file(p)));
      if (st.st_nlink > 1) d += " group " + first_name.emplace(st.st_ino, rel).first->second;
    }
    if (S_ISLNK(st.st_mode)) d += " -> " + fs::read_symlink(p).string();
    if (S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode)) d += " dev" + std::to_string(st.st_rdev);
    char names[4096];
    ssize_t n = ::llistxattr(p.c_str(), names, sizeof names);
    std::vector<std::string> keys;
    for (ssize_t i = 0; i < n; i += static_cast<ssize_t>(keys.back().size()) + 1) keys.emplace_back(names + i);
    std::sort(keys.begin(), keys.end());
    for (const auto& k : keys) {
      char value[4096];
      ssize_t m = ::lgetxattr(p.c_str(), k.c_str(), value, sizeof value);
      d += " x:" + k + "=" + std::string(value, static_cast<std::size_t>(std::max<ssize_t>(m, 0)));
    }
    out[rel] = d;
  }
  return out;
}

void must(int r, const std::string& what) {
  if (r != 0) throw std::runtime_error(what + ": " + std::strerror(errno));
}

class DiffTest : public test::DriverFixture {
 protected:
  DiffTest() : DriverFixture("diff") {}

  void SetUp() override {
    DriverFixture::SetUp();
    if (IsSkipped()) return;
    outside_ = dir_ + "/outside";
    write_file(outside_ + "/secret", "secret\n");
  }

  void TearDown() override {
    if (loop_) {
      stop_driver();
      // Nothing outside the home was ever touched.
      EXPECT_EQ(test::listing(outside_), std::vector<std::string>{"secret file 7"});
    }
    DriverFixture::TearDown();
  }

  std::uint64_t apply(const std::string& id, const std::string& parent, std::vector<std::byte> tar) {
    MemorySource source(std::move(tar), 1 << 16, /*yield=*/true);
    return run(driver_->apply_diff(id, parent, source));
  }
  std::vector<std::byte> diff(const std::string& id, const std::string& parent) {
    MemorySink sink;
    run(driver_->diff(id, parent, sink));
    return std::move(sink.bytes);
  }
  std::vector<std::string> changes(const std::string& id, const std::string& parent) {
    return docker_form(run(driver_->changes(id, parent)));
  }
  std::uint64_t diff_size(const std::string& id, const std::string& parent) {
    return run(driver_->diff_size(id, parent));
  }

  // The base image every scripted test starts from.
  void make_base() {
    create("base");
    std::vector<TarEntry> entries = {
        {.name = "d/", .type = AE_IFDIR, .perm = 0755},
        {.name = "d/old1", .data = "1"},
        {.name = "d/old2", .data = "2"},
        {.name = "dir2file/", .type = AE_IFDIR, .perm = 0755},
        {.name = "dir2file/inner", .data = "inner"},
        {.name = "etc/", .type = AE_IFDIR, .perm = 0755},
        {.name = "etc/hosts", .data = "127.0.0.1 localhost\n"},
        {.name = "etc/passwd", .perm = 0600, .data = "root:x:0:0\n", .uid = 0, .gid = 42},
        {.name = "file2dir", .data = "a file"},
        {.name = "lib/", .type = AE_IFDIR, .perm = 0755},
        {.name = "lib/a", .data = "aaaa"},
        {.name = "lib/keep", .perm = 04755, .data = "suid", .uid = 1000, .gid = 1000},
        {.name = "lib/keep-link", .hardlink = "lib/keep"},
        {.name = "rt/", .type = AE_IFDIR, .perm = 0755},
        {.name = "rt/oldchild", .data = "old"},
        {.name = "sym", .type = AE_IFLNK, .perm = 0777, .link = "etc/hosts"},
        {.name = "xattr", .data = "x", .xattrs = {{"user.base", "v"}}},
    };
    apply("base", "", make_tar(entries));
  }

  // Scripted container edits, made through the fuse-overlayfs mount.
  static void edit_container(const std::string& m) {
    write_file(m + "/etc/newfile", "new\n");                                   // add
    write_file(m + "/etc/hosts", "127.0.0.1 localhost\n10.0.0.1 db\n");        // modify
    must(::unlink((m + "/lib/a").c_str()), "unlink lib/a");                    // delete a lower file
    fs::remove_all(m + "/dir2file");                                           // directory -> file
    write_file(m + "/dir2file", "now a file");
    must(::unlink((m + "/file2dir").c_str()), "unlink file2dir");              // file -> directory
    write_file(m + "/file2dir/child", "child");
    fs::remove_all(m + "/rt");                                                 // directory -> file -> directory
    write_file(m + "/rt", "file for a while");
    must(::unlink((m + "/rt").c_str()), "unlink rt");
    write_file(m + "/rt/x", "");
    fs::remove_all(m + "/d");                                                  // opaque directory
    must(::mkdir((m + "/d").c_str(), 0755), "mkdir d");
    write_file(m + "/d/new", "");
  }

  std::string outside_;
};

TEST_F(DiffTest, ApplyDiffIntoAChainReadsThroughTheMergedView) {
  create("base");
  EXPECT_EQ(apply("base", "", make_tar({{.name = "etc/", .type = AE_IFDIR, .perm = 0755},
                                        {.name = "etc/hello", .data = "from base\n"},
                                        {.name = "etc/shadowed", .data = "base\n"},
                                        {.name = "gone", .data = "x"},
                                        {.name = "opaque/old", .data = "old"},
                                        {.name = "link", .type = AE_IFLNK, .perm = 0777, .link = "etc/hello"}})),
            10u + 5 + 1 + 3 + 9);
  create("mid", "base");
  // Compressed, as layerctl users may send it; AUFS whiteouts as Docker sends them.
  EXPECT_EQ(apply("mid", "base", make_tar({{.name = "etc/shadowed", .perm = 0640, .data = "mid\n", .uid = 7, .gid = 8},
                                           {.name = ".wh.gone"},
                                           {.name = "opaque/", .type = AE_IFDIR, .perm = 0755},
                                           {.name = "opaque/.wh..wh..opq"},
                                           {.name = "opaque/new", .data = "new"},
                                           {.name = "big", .data = std::string(3 << 20, 'b')}},
                                          "zstd")),
            4u + 3 + (3u << 20));
  create("top", "mid", true);
  const std::string merged = get("top");
  EXPECT_EQ(read_file(merged + "/etc/hello"), "from base\n");
  EXPECT_EQ(read_file(merged + "/etc/shadowed"), "mid\n");
  EXPECT_EQ(read_file(merged + "/link"), "from base\n");
  EXPECT_EQ(read_file(merged + "/big").size(), 3u << 20);
  EXPECT_FALSE(fs::exists(merged + "/gone"));
  EXPECT_FALSE(fs::exists(merged + "/opaque/old"));
  EXPECT_EQ(read_file(merged + "/opaque/new"), "new");
  struct stat st {};
  ASSERT_EQ(::lstat((merged + "/etc/shadowed").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0640u);
  EXPECT_EQ(st.st_uid, 7u);
  EXPECT_EQ(st.st_gid, 8u);
  EXPECT_EQ(st.st_mtim.tv_sec, 1'600'000'000);
  // Nothing left in the home but layers and links: no staging directories.
  for (const auto& entry : fs::directory_iterator(home_))
    EXPECT_FALSE(entry.path().filename().string().starts_with(".layerd-")) << entry.path();
}

TEST_F(DiffTest, ExactChangesForScriptedContainerEdits) {
  make_base();
  create("c", "base", true);
  edit_container(get("c"));
  const std::vector<std::string> expected = {
      "C /d",        "A /d/new",        "D /d/old1", "D /d/old2",     //
      "C /dir2file",                                                  //
      "C /etc",      "C /etc/hosts",    "A /etc/newfile",             //
      "C /file2dir", "A /file2dir/child",                             //
      "C /lib",      "D /lib/a",                                      //
      "C /rt",       "D /rt/oldchild",  "A /rt/x",
  };
  // Native (upper directory only), mounted or not.
  EXPECT_EQ(changes("c", "base"), expected);
  put("c");
  EXPECT_EQ(changes("c", "base"), expected);
  // The whiteouts and opaque markers are in fuse-overlayfs's own form here (0/0 character
  // devices, opaque xattrs), not AUFS files.
  struct stat st {};
  ASSERT_EQ(::lstat((diff_dir("c") + "/lib/a").c_str(), &st), 0);
  EXPECT_TRUE(S_ISCHR(st.st_mode) && st.st_rdev == makedev(0, 0)) << st.st_mode;
  // DiffSize: what Diff carries (whiteouts and directories weigh nothing).
  EXPECT_EQ(diff_size("c", "base"), std::string("now a file").size() + std::string("127.0.0.1 localhost\n10.0.0.1 db\n").size() +
                                        std::string("new\n").size() + std::string("child").size());
  // The tar Diff sends: AUFS whiteouts, deterministic order.
  EXPECT_EQ(list_tar(diff("c", "base")),
            (std::vector<std::string>{"d d/", "f d/.wh..wh..opq", "f d/new", "f dir2file", "d etc/", "f etc/hosts",
                                      "f etc/newfile", "d file2dir/", "f file2dir/.wh..wh..opq", "f file2dir/child",
                                      "d lib/", "f lib/.wh.a", "d rt/", "f rt/.wh..wh..opq", "f rt/x"}));
}

TEST_F(DiffTest, DiffApplyRoundTripGivesTheSameMergedTree) {
  make_base();
  create("c", "base", true);
  const std::string m = get("c");
  edit_container(m);
  // Modes, owners, times, xattrs, links, special files, made through the mount.
  write_file(m + "/owned", "owned");
  must(::chown((m + "/owned").c_str(), 1234, 5678), "chown");
  must(::chmod((m + "/owned").c_str(), 02750), "chmod");
  must(::symlink("../etc/hosts", (m + "/lib/hosts-link").c_str()), "symlink");
  must(::link((m + "/etc/newfile").c_str(), (m + "/hard").c_str()), "link");
  must(::mkfifo((m + "/fifo").c_str(), 0600), "mkfifo");
  must(::mknod((m + "/null").c_str(), S_IFCHR | 0666, makedev(1, 3)), "mknod");
  must(::setxattr((m + "/etc/hosts").c_str(), "user.note", "changed", 7, 0), "setxattr");
  must(::chmod((m + "/etc/passwd").c_str(), 0640), "chmod passwd");  // metadata-only copy-up
  timespec times[2] = {{1'700'000'000, 0}, {1'700'000'000, 0}};
  must(::utimensat(AT_FDCWD, (m + "/etc/newfile").c_str(), times, 0), "utimensat");
  write_file(m + "/deep/a/b/c/file", "deep");

  std::vector<std::byte> tar = diff("c", "base");
  const auto original = merged_snapshot(m);
  const auto original_changes = changes("c", "base");

  create("c2", "base", true);
  EXPECT_GT(apply("c2", "base", tar), 0u);
  const std::string m2 = get("c2");
  const auto copy = merged_snapshot(m2);
  EXPECT_EQ(copy, original);
  for (const auto& [path, description] : original) {
    auto it = copy.find(path);
    if (it == copy.end()) ADD_FAILURE() << "missing in the copy: " << path;
    else if (it->second != description) ADD_FAILURE() << path << "\n  original: " << description << "\n  copy:     " << it->second;
  }
  EXPECT_EQ(original.count("/lib/a") + original.count("/d/old1") + original.count("/rt/oldchild"), 0u);
  // Whiteouts too: the copy reports the same changes (its upper holds AUFS-form whiteouts).
  EXPECT_EQ(changes("c2", "base"), original_changes);
  // And a second Diff of the copy is byte-identical to the first.
  EXPECT_EQ(diff("c2", "base"), tar);
}

TEST_F(DiffTest, NaiveFallbackForAParentThatIsNotTheDirectOne) {
  make_base();
  create("mid", "base");
  apply("mid", "base", make_tar({{.name = "etc/", .type = AE_IFDIR, .perm = 0755},
                                 {.name = "etc/hosts", .data = "changed in mid\n", .mtime = 1'650'000'000},
                                 {.name = "m/", .type = AE_IFDIR, .perm = 0755},
                                 {.name = "m/file", .data = "mid file"}}));
  create("top", "mid", true);
  const std::string m = get("top");
  must(::unlink((m + "/etc/passwd").c_str()), "unlink");
  write_file(m + "/t", "top!");
  put("top");

  // Direct parent: only top's own edits.
  EXPECT_EQ(changes("top", "mid"), (std::vector<std::string>{"C /etc", "D /etc/passwd", "A /t"}));
  // Grandparent: a full comparison of the merged trees (mid's changes included).
  const std::vector<std::string> full = {"C /etc", "C /etc/hosts", "D /etc/passwd", "A /m", "A /m/file", "A /t"};
  EXPECT_EQ(sorted(changes("top", "base")), sorted(full));
  EXPECT_EQ(diff_size("top", "base"), std::string("changed in mid\n").size() + 8 + 4);
  EXPECT_EQ(sorted(list_tar(diff("top", "base"))),
            sorted({"d etc/", "f etc/hosts", "f etc/.wh.passwd", "d m/", "f m/file", "f t"}));
  // No parent at all: everything is added.
  auto all = changes("top", "");
  EXPECT_NE(std::find(all.begin(), all.end(), "A /lib/keep"), all.end());
  EXPECT_NE(std::find(all.begin(), all.end(), "A /m/file"), all.end());
  EXPECT_EQ(std::count_if(all.begin(), all.end(), [](const std::string& s) { return s[0] != 'A'; }), 0);
  // The naive path mounted and released what it needed.
  for (const auto& layer : driver_->layers()) EXPECT_EQ(layer.refcount, 0) << layer.id;
  EXPECT_EQ(test::mounts_under(dir_), std::vector<std::string>{});
}

TEST_F(DiffTest, HostileTarsLeaveTheLayerEmptyAndNothingElseOnDisk) {
  create("base");
  apply("base", "", make_tar({{.name = "f", .data = "f"}}));
  create("victim", "base");
  const auto home_before = test::listing(home_);

  std::vector<std::byte> good = make_tar({{.name = "a/b", .data = std::string(200'000, 'x')}}, "gzip");
  std::vector<std::byte> corrupt_gzip = good;
  for (std::size_t i = 100; i < 400 && i < corrupt_gzip.size(); ++i) corrupt_gzip[i] = std::byte{0x5a};
  std::vector<std::byte> truncated = make_tar({{.name = "big", .data = std::string(300'000, 'y')}});
  truncated.resize(150'000);
  // A header declaring 1 MiB followed by 5 bytes of data and the end of the stream (libarchive's
  // writer would pad the data to the declared size: cut it right after the first data block).
  std::vector<std::byte> liar = make_tar({{.name = "liar", .data = "short", .declared_size = 1 << 20}});
  liar.resize(1024);

  struct Case {
    std::string name;
    std::vector<std::byte> tar;
    std::string expected;  // in the error message
  };
  std::vector<Case> cases = {
      {"traversal", make_tar({{.name = "ok", .data = "1"}, {.name = "../escape", .data = "x"}}), "../escape"},
      {"deep traversal", make_tar({{.name = "a/", .type = AE_IFDIR}, {.name = "a/../../../escape", .data = "x"}}), "escape"},
      {"symlink escape", make_tar({{.name = "esc", .type = AE_IFLNK, .perm = 0777, .link = outside_},
                                   {.name = "esc/pwned", .data = "x"}}), "esc/pwned"},
      {"relative symlink escape", make_tar({{.name = "esc", .type = AE_IFLNK, .perm = 0777, .link = "../../../outside"},
                                            {.name = "esc/secret", .data = "overwritten"}}), "esc/secret"},
      {"hardlink outside", make_tar({{.name = "h", .hardlink = "../../outside/secret"}}), "'h'"},
      {"hardlink through symlink", make_tar({{.name = "esc", .type = AE_IFLNK, .perm = 0777, .link = outside_},
                                             {.name = "h", .hardlink = "esc/secret"}}), "'h'"},
      {"hardlink to missing", make_tar({{.name = "h", .hardlink = "nothing"}}), "does not exist"},
      {"long name", make_tar({{.name = std::string(5000, 'n'), .data = "x"}}), "long"},
      {"declared size larger than the data", liar, "liar"},
      {"truncated", truncated, "big"},
      {"corrupt gzip", corrupt_gzip, "tar"},
      {"duplicate", make_tar({{.name = "dup", .data = "1"}, {.name = "dup", .data = "2"}}), "dup"},
      {"file under a file", make_tar({{.name = "f", .data = "1"}, {.name = "f/g", .data = "2"}}), "f/g"},
      {"garbage", std::vector<std::byte>(10'000, std::byte{0x41}), "tar"},
  };
  for (auto& c : cases) {
    SCOPED_TRACE(c.name);
    try {
      apply("victim", "base", std::move(c.tar));
      ADD_FAILURE() << "accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("ApplyDiff of layer victim"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(c.expected), std::string::npos) << e.what();
    }
    EXPECT_TRUE(fs::is_empty(diff_dir("victim")));
    EXPECT_EQ(test::listing(home_), home_before);
  }
  // The layer is still usable afterwards.
  EXPECT_EQ(apply("victim", "base", good), 200'000u);
  EXPECT_EQ(read_file(get("victim") + "/a/b").size(), 200'000u);
}

TEST_F(DiffTest, ApplyDiffOntoAMountedOrNonEmptyLayerIsRefused) {
  create("base");
  apply("base", "", make_tar({{.name = "f", .data = "f"}}));
  create("c", "base", true);
  get("c");
  try {
    apply("c", "base", make_tar({{.name = "g", .data = "g"}}));
    ADD_FAILURE() << "applied onto a mounted layer";
  } catch (const Error& e) {
    EXPECT_EQ(e.errno_value(), EBUSY);
    EXPECT_NE(std::string(e.what()).find("mounted"), std::string::npos) << e.what();
  }
  put("c");
  EXPECT_TRUE(fs::is_empty(diff_dir("c")));
  try {
    apply("base", "", make_tar({{.name = "g", .data = "g"}}));
    ADD_FAILURE() << "applied onto a layer with content";
  } catch (const Error& e) {
    EXPECT_EQ(e.errno_value(), EEXIST);
    EXPECT_NE(std::string(e.what()).find("already has content"), std::string::npos) << e.what();
  }
  EXPECT_EQ(test::listing(diff_dir("base")), std::vector<std::string>{"f file 1"});
  // A wrong parent is refused too.
  create("other");
  EXPECT_THROW(apply("c", "other", make_tar({{.name = "g", .data = "g"}})), Error);
  EXPECT_TRUE(fs::is_empty(diff_dir("c")));
}

}  // namespace
