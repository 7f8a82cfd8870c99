// upper_changes (native), compare_trees (naive) and upper_diff_size against hand-written
// expectations for scripted container edits; the two paths must agree.
#include <gtest/gtest.h>

#include "helpers.hpp"
#include "layerd/core/loop.hpp"

using namespace archive_test;
using namespace layerd;
using layerd::archive::Change;

namespace {

constexpr time_t kTime = 1'600'000'000;

void mkdirs(const std::string& root, const std::string& rel, mode_t mode = 0755) {
  std::string path = root + "/" + rel;
  ASSERT_EQ(::mkdir(path.c_str(), mode), 0) << path;
  ::chmod(path.c_str(), mode);
}

void file(const std::string& root, const std::string& rel, const std::string& content, time_t mtime = kTime) {
  std::string path = root + "/" + rel;
  int fd = ::open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0) << path;
  ASSERT_EQ(::write(fd, content.data(), content.size()), static_cast<ssize_t>(content.size()));
  timespec times[2] = {{mtime, 0}, {mtime, 0}};
  ::futimens(fd, times);
  ::close(fd);
}

// The image: what the lower (and the old merged view) holds.
void base_image(const std::string& root) {
  mkdirs(root, "etc");
  file(root, "etc/hosts", "127.0.0.1\n");
  file(root, "etc/passwd", "root\n");
  mkdirs(root, "usr");
  mkdirs(root, "usr/bin");
  file(root, "usr/bin/sh", "ELF");
  file(root, "usr/bin/ls", "ELF");
  mkdirs(root, "var");
  mkdirs(root, "var/lib");
  mkdirs(root, "var/lib/x");
  file(root, "var/lib/x/a", "a");
  mkdirs(root, "opt");
  file(root, "opt/file", "f");
  mkdirs(root, "data");
  file(root, "data/f1", "1");
  mkdirs(root, "data/sub");
  file(root, "data/sub/deep", "d");
  mkdirs(root, "keep");
  file(root, "keep/k", "k");
}

const std::vector<Change> kExpected{
    {"/data", Change::kModified},     {"/data/f1", Change::kDeleted},  {"/data/f2", Change::kAdded},
    {"/data/sub", Change::kDeleted},  {"/etc", Change::kModified},     {"/etc/hosts", Change::kModified},
    {"/etc/newfile", Change::kAdded}, {"/new", Change::kAdded},        {"/new/inner", Change::kAdded},
    {"/opt", Change::kModified},      {"/opt/file", Change::kModified}, {"/opt/file/c", Change::kAdded},
    {"/usr", Change::kModified},      {"/usr/bin", Change::kModified}, {"/usr/bin/sh", Change::kDeleted},
    {"/var", Change::kModified},      {"/var/lib", Change::kModified}, {"/var/lib/x", Change::kModified},
};

std::string show(const std::vector<Change>& changes) {
  std::string out;
  for (const auto& c : changes) out += std::string(1, "CAD"[c.kind]) + " " + c.path + "\n";
  return out;
}

TEST(Changes, ScriptedEditsNativeAndNaive) {
  TempDir tmp;
  std::string lower = tmp.sub("lower"), upper = tmp.sub("upper"), merged = tmp.sub("merged");
  base_image(lower);
  // The container's upper directory (AUFS-form whiteouts, as applied layers and unprivileged
  // fuse-overlayfs keep them): copied-up parents keep the lower's mode and owner.
  mkdirs(upper, "etc");
  file(upper, "etc/hosts", "127.0.0.1 changed\n", kTime + 5);  // modify
  file(upper, "etc/newfile", "new");                           // add
  mkdirs(upper, "usr");
  mkdirs(upper, "usr/bin");
  file(upper, "usr/bin/.wh.sh", "");  // delete a lower file
  mkdirs(upper, "var");
  mkdirs(upper, "var/lib");
  file(upper, "var/lib/x", "now a file");  // a directory replaced by a file
  mkdirs(upper, "opt");
  mkdirs(upper, "opt/file");  // a file replaced by a directory
  file(upper, "opt/file/c", "c");
  mkdirs(upper, "data");  // rm -rf /data; mkdir /data; echo > /data/f2: opaque
  file(upper, "data/.wh..wh..opq", "");
  file(upper, "data/f2", "2");
  mkdirs(upper, "new");
  file(upper, "new/inner", "i");
  file(upper, "new/.wh.ignored", "");  // a whiteout of nothing: no change
  file(upper, ".wh.never-existed", "");

  // The same edits on a copy: the new merged view.
  base_image(merged);
  file(merged, "etc/hosts", "127.0.0.1 changed\n", kTime + 5);
  file(merged, "etc/newfile", "new");
  ASSERT_EQ(::unlink((merged + "/usr/bin/sh").c_str()), 0);
  std::filesystem::remove_all(merged + "/var/lib/x");
  file(merged, "var/lib/x", "now a file");
  ASSERT_EQ(::unlink((merged + "/opt/file").c_str()), 0);
  mkdirs(merged, "opt/file");
  file(merged, "opt/file/c", "c");
  std::filesystem::remove_all(merged + "/data");
  mkdirs(merged, "data");
  file(merged, "data/f2", "2");
  mkdirs(merged, "new");
  file(merged, "new/inner", "i");

  core::Loop loop;
  sys::UniqueFd up(open_dir(upper)), lo(open_dir(lower)), me(open_dir(merged));
  std::vector<int> lowers{lo.get()};
  auto native = loop.block_on(layerd::archive::upper_changes(up.get(), lowers));
  EXPECT_EQ(show(native), show(kExpected));
  auto naive = loop.block_on(layerd::archive::compare_trees(me.get(), lo.get()));
  EXPECT_EQ(show(naive), show(kExpected));

  // DiffSize: every non-directory in the upper dir (whiteouts are empty).
  auto size = loop.block_on(layerd::archive::upper_diff_size(up.get()));
  EXPECT_EQ(size, 18u + 3u + 10u + 1u + 1u + 1u);
}

TEST(Changes, LowerWhiteoutsAndOpaqueLayersAreHonoured) {
  TempDir tmp;
  std::string base = tmp.sub("base"), mid = tmp.sub("mid"), upper = tmp.sub("upper");
  mkdirs(base, "d");
  file(base, "d/a", "a");
  file(base, "d/b", "b");
  file(base, "gone", "g");
  // The middle layer deletes /gone and /d/a.
  mkdirs(mid, "d");
  file(mid, "d/.wh.a", "");
  file(mid, ".wh.gone", "");
  // The container deletes /d/b, recreates /gone, whites out /d/a again (already gone).
  mkdirs(upper, "d");
  file(upper, "d/.wh.b", "");
  file(upper, "d/.wh.a", "");
  file(upper, "gone", "again");
  core::Loop loop;
  sys::UniqueFd up(open_dir(upper)), m(open_dir(mid)), b(open_dir(base));
  std::vector<int> lowers{m.get(), b.get()};
  auto native = loop.block_on(layerd::archive::upper_changes(up.get(), lowers));
  std::vector<Change> expected{{"/d", Change::kModified}, {"/d/b", Change::kDeleted}, {"/gone", Change::kAdded}};
  EXPECT_EQ(show(native), show(expected));
}

TEST(Changes, CompareTreesWithoutParent) {
  TempDir tmp;
  std::string root = tmp.sub("root");
  mkdirs(root, "a");
  file(root, "a/f", "x");
  file(root, "b", "y");
  core::Loop loop;
  sys::UniqueFd fd(open_dir(root));
  auto changes = loop.block_on(layerd::archive::compare_trees(fd.get(), -1));
  std::vector<Change> expected{{"/a", Change::kAdded}, {"/a/f", Change::kAdded}, {"/b", Change::kAdded}};
  EXPECT_EQ(show(changes), show(expected));
}

TEST(Changes, MetadataOnlyChangeOfADirectory) {
  TempDir tmp;
  std::string lower = tmp.sub("lower"), upper = tmp.sub("upper");
  mkdirs(lower, "d", 0755);
  file(lower, "d/x", "x");
  mkdirs(upper, "d", 0700);  // chmod 700 /d
  core::Loop loop;
  sys::UniqueFd up(open_dir(upper)), lo(open_dir(lower));
  std::vector<int> lowers{lo.get()};
  auto native = loop.block_on(layerd::archive::upper_changes(up.get(), lowers));
  std::vector<Change> expected{{"/d", Change::kModified}};
  EXPECT_EQ(show(native), show(expected));
}

}  // namespace
